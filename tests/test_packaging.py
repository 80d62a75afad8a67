"""The declared dependencies cover what the code uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# torch APIs the package uses that are younger than torch 2.0, with the release that brought
# each one (from torch's release notes).
TORCH_APIS = {
    'torch.amp.GradScaler("cuda"': (2, 3),  # torch.amp.GradScaler; before: torch.cuda.amp's
    "torch.utils.flop_counter": (2, 1),
    "fork_rng(devices=devices, device_type=": (2, 1),  # fork_rng's device_type
}


def _lower_bound(name: str) -> tuple[int, ...]:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{name}>=([\d.]+)', text)
    assert match, f"pyproject.toml declares no lower bound for {name}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_declared_torch_and_torchvision_cover_the_torch_apis_used():
    source = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    used = {api: version for api, version in TORCH_APIS.items() if api in source}
    assert 'torch.amp.GradScaler("cuda"' in used  # the table still finds what it is about
    need = max(used.values())
    torch_min = _lower_bound("torch")
    assert torch_min[:2] >= need, f"torch>={torch_min} but the code needs {need}: {used}"
    # torchvision 0.(N+15) is built for torch 2.N
    assert _lower_bound("torchvision")[:2] == (0, torch_min[1] + 15)
