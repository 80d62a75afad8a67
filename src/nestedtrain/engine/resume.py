"""What ``--resume`` may change: the recipe of a resumed run against the run's ``config.yaml``.

A resumed run ends bit-identical to one never stopped only if it computes the same thing. A
field that changes what is computed (epochs, batch size, optimizer, schedule, method and its
options, model, data, seed, ...) refuses the resume with one line naming each change, unless
the user allows it; the allowed changes are recorded in ``resume_changes.jsonl``. Fields that
do not change the computation (:data:`NEUTRAL`) are taken and noted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..atomic import atomic_append_line, atomic_write_text
from ..errors import ConfigError
from ..records import CONFIG_FILE
from .config import load_config, to_yaml

__all__ = ["CHANGES_FILE", "NEUTRAL", "UNLOADABLE", "RecipeChanges", "check_resume_recipe"]

CHANGES_FILE = "resume_changes.jsonl"

# Fields (or sections, ending in ".") that do not change the weights a run computes: what is
# evaluated and logged, how often checkpoints are written, where the same images are read
# from (a node's scratch disk, say) and by how many workers, and the device (which changes
# the last bits, not the run: resuming on another machine is what a requeue does).
NEUTRAL = (
    "eval.",
    "log_every",
    "checkpoint.",
    "data.num_workers",
    "data.root",
    "data.download",
    "data.bad_images",
    "data.max_bad_fraction",
    "device",
)
# Fields a checkpoint cannot be loaded across, whatever the user allows.
UNLOADABLE = ("model.name", "motivation.model", "data.name")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else prefix + key))
    return flat


def _neutral(field: str) -> bool:
    return any(field == n or (n.endswith(".") and field.startswith(n)) for n in NEUTRAL)


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{field} {old!r} → {new!r}" for field, (old, new) in changes.items())


@dataclass
class RecipeChanges:
    """How the recipe of a resume differs from the run's ``config.yaml``: field -> (old, new)."""

    computed: dict[str, tuple[Any, Any]]  # change what the run computes (allowed by the user)
    neutral: dict[str, tuple[Any, Any]]  # do not

    def record(self, folder: Path, cfg: DictConfig) -> None:
        """Append the changes to ``resume_changes.jsonl`` and make ``config.yaml`` the new
        recipe (its comment header kept), so that the next resume compares with it."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "computed": {k: list(v) for k, v in self.computed.items()},
            "neutral": {k: list(v) for k, v in self.neutral.items()},
        }
        atomic_append_line(folder / CHANGES_FILE, json.dumps(entry))
        config = folder / CONFIG_FILE
        lines = config.read_text().splitlines(keepends=True) if config.exists() else []
        header = "".join(line for line in lines if line.startswith("#"))
        atomic_write_text(config, header + to_yaml(cfg))

    def __bool__(self) -> bool:
        return bool(self.computed or self.neutral)

    def describe(self) -> str:
        """One line for the log."""
        parts = []
        if self.computed:
            parts.append(f"changes allowed by --allow-changes: {_describe(self.computed)}")
        if self.neutral:
            parts.append(f"changes that do not alter the run: {_describe(self.neutral)}")
        return "resuming with " + "; ".join(parts)


def check_resume_recipe(folder: Path, cfg: DictConfig, allow_changes: bool) -> RecipeChanges:
    """Compare ``cfg`` with ``folder/config.yaml`` for a resume.

    Returns the changes (empty when none, or when the folder has no ``config.yaml``).

    Raises:
        ConfigError: a field that changes the computation differs and ``allow_changes`` is
            off, naming each as ``old → new``; or one a checkpoint cannot load across does.
    """
    path = folder / CONFIG_FILE
    if not path.exists():
        return RecipeChanges({}, {})
    old = _flatten(OmegaConf.to_container(load_config(path), resolve=True))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    unloadable = {k: v for k, v in changed.items() if k in UNLOADABLE}
    if unloadable:
        raise ConfigError(
            f"--resume: {_describe(unloadable)} differs from {str(path)!r}, and a checkpoint "
            "does not load across it: resume with the run's recipe, or start a new run "
            "(another --out)"
        )
    computed = {k: v for k, v in changed.items() if not _neutral(k)}
    if computed and not allow_changes:
        raise ConfigError(
            f"--resume: the recipe changes what the run computes: {_describe(computed)} "
            f"(against {str(path)!r}); resume with the run's recipe, or pass --allow-changes "
            f"to go on with these (recorded in {CHANGES_FILE})"
        )
    neutral = {k: v for k, v in changed.items() if _neutral(k)}
    return RecipeChanges(computed, neutral)
