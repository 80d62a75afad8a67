"""The README's Python example runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data import write_image_tree

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start : text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["info"]["subnets"] and not namespace["model"].training
    assert str(namespace["sub"]) == "5-9-3"


def test_readme_example_on_an_image_folder_with_workers_exits(tmp_path):
    """The example's ``data`` is a module global when the script ends: its persistent
    workers, which ignore SIGTERM, must not keep the interpreter from exiting."""
    write_image_tree(tmp_path / "images", {"train": 8, "val": 2}, size=12)
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start : text.index("```", start)]
    folder = f'DataConfig(name="imagefolder", root={str(tmp_path / "images")!r}, img_size=8'
    for old, new in [
        ('DataConfig(name="digits"', f"{folder}, val_size=0, num_workers=2"),
        ("batch_size=64", "batch_size=8"),
        ("in_chans=1", "in_chans=3"),
        ("torch.randn(8, 1, 8, 8)", "torch.randn(8, 3, 8, 8)"),
    ]:
        assert old in code
        code = code.replace(old, new)
    script = tmp_path / "example.py"
    script.write_text(code + "\nimport time\nprint(time.time(), flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the example's process did not exit")
    exited = time.time()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert exited - float(out.split()[-1]) < 10  # measured about 2 s (join, torch's exit)
