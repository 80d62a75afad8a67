"""Sweeps: one recipe, the cross product of override values, one run folder per setting.

``expand_grid(["method=ct,st", "seed=0,1,2", "epochs=10"])`` gives six runs; a ``key=a,b``
override is a grid axis, a plain ``key=value`` applies to every run, and ``+`` starts another
grid (see :func:`expand_grid`). Commas inside brackets or
braces (``st.resize=[0.43,1.0]``) and escaped ones (``eval.subnets=3-2-4\\,2-2-2``) do not split.

:func:`run_sweep` trains the runs that are not finished, each as its own ``nestedtrain train``
process (so a run that fails or dies takes no other run with it), at most ``jobs`` at a time
with the CPU threads divided between them. A finished run (``summary.json``) is skipped, an
interrupted one (a checkpoint) resumed, one that died before its first checkpoint restarted.
``DIR/sweep.json`` records each run's recipe and overrides for ``nestedtrain compare``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..atomic import atomic_write_text, previous_path
from ..errors import ConfigError
from ..records import CONFIG_FILE, SUMMARY_FILE
from .config import load_config

__all__ = [
    "SWEEP_FILE",
    "SweepRun",
    "RunOutcome",
    "expand_grid",
    "plan_sweep",
    "read_sweep",
    "run_sweep",
    "shell_command",
    "train_command",
]

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepRun:
    """One setting of a sweep: its folder name and its ``key=value`` overrides."""

    name: str
    overrides: tuple[str, ...]


@dataclass
class RunOutcome:
    """What became of one run: ``done`` (already finished), ``trained``, or ``failed``."""

    run: SweepRun
    status: str
    seconds: float = 0.0
    error: str | None = None  # the run's one-line error, when it failed


def _split_values(text: str) -> list[str]:
    """Split at commas outside brackets and braces; ``\\,`` is a literal comma."""
    values, current, depth, i = [], [], 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] == ",":
            current.append(",")
            i += 2
            continue
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    values.append("".join(current))
    return values


def _name_part(key: str, value: str) -> str:
    # Folder-name safe, still readable: method=st, st.resize=[0.43_1.0], data.root=_data_x
    return f"{key}=" + re.sub(r"[^A-Za-z0-9._\-\[\]]+", "_", value)


def _parse_axes(overrides: Sequence[str]) -> list[tuple[str, list[str]]]:
    axes: list[tuple[str, list[str]]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"sweep override {item!r} must be key=value or key=v1,v2,...")
        if any(key == k for k, _ in axes):
            raise ConfigError(f"sweep override key {key!r} is given twice: list its values once")
        values = _split_values(value)
        if any(v == "" for v in values):
            raise ConfigError(f"sweep override {item!r} has an empty value")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep override {item!r} lists a value twice")
        axes.append((key, values))
    return axes


def expand_grid(overrides: Sequence[str]) -> list[SweepRun]:
    """The runs of the cross product of ``overrides`` (see the module docstring).

    A ``+`` among the overrides starts another grid: what comes before the first ``+`` applies
    to every grid, and each part after it adds its own cross product. So a motivation run and
    its classical baselines fit in one sweep::

        seed=0,1,2 + method=motivation + method=ct model.name=resnet20,resnet32

    A run's folder name joins all of its overrides in the order given (``seed=1,method=st``),
    so it does not change when the sweep is run again with more values or other grids, and
    runs of different sweeps into one folder do not collide.

    Raises:
        ConfigError: an override that is not ``key=value``, an empty value, a key given twice,
            an empty part around a ``+``, or two runs with the same overrides.
    """
    parts: list[list[str]] = [[]]
    for item in overrides:
        if item == "+":
            parts.append([])
        else:
            parts[-1].append(item)
    common, *grids = parts
    if any(not grid for grid in grids):
        raise ConfigError("a '+' in the sweep must be followed by overrides of another grid")
    settings: list[list[tuple[str, str]]] = []
    for grid in grids or [[]]:
        axes = _parse_axes([*common, *grid])
        for combination in product(*(values for _, values in axes)):
            settings.append([(key, value) for (key, _), value in zip(axes, combination)])
    if len({tuple(sorted(pairs)) for pairs in settings}) != len(settings):
        raise ConfigError("the sweep's grids give the same run twice: make the grids disjoint")
    runs = []
    for pairs in settings:
        name = ",".join(_name_part(k, v) for k, v in pairs) or "default"
        runs.append(SweepRun(name, tuple(f"{k}={v}" for k, v in pairs)))
    if len({run.name for run in runs}) != len(runs):
        raise ConfigError(
            "two runs of the sweep get the same folder name: their values differ "
            "only in characters a folder name cannot hold"
        )
    return runs


def train_command(recipe: str | Path, run: SweepRun, out_dir: str | Path) -> list[str]:
    """The ``nestedtrain train`` command line of one run (without ``--resume``)."""
    return [
        "nestedtrain",
        "train",
        str(recipe),
        *run.overrides,
        "--out",
        str(Path(out_dir) / run.name),
    ]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix[:-1]}={a!r} there, {b!r} here"


def _state(folder: Path) -> str:
    if (folder / SUMMARY_FILE).is_file():
        return "done"
    last = folder / "checkpoints" / "last.pt"
    if last.is_file() or previous_path(last).is_file():
        return "resume"
    return "restart" if folder.exists() else "new"


def plan_sweep(
    recipe: str | Path, runs: Sequence[SweepRun], out_dir: str | Path
) -> list[tuple[SweepRun, str]]:
    """Check every run's recipe and its folder; returns ``(run, state)`` with state ``done``,
    ``resume``, ``restart`` or ``new``. Writes nothing.

    Raises:
        ConfigError: a run whose recipe does not resolve (named with the run), or a folder
            that holds a run of other settings.
    """
    out_dir = Path(out_dir)
    planned = []
    for run in runs:
        try:
            cfg = load_config(recipe, list(run.overrides))
        except ValueError as err:
            raise ConfigError(f"run {run.name}: {err}") from None
        folder = out_dir / run.name
        state = _state(folder)
        if (folder / CONFIG_FILE).is_file():
            # read through the schema: a field added since the run was made is its default
            stored = load_config(folder / CONFIG_FILE)
            there = _comparable(OmegaConf.to_container(stored, resolve=True))
            here = _comparable(OmegaConf.to_container(cfg, resolve=True))
            difference = _first_difference(there, here)
            if difference:
                raise ConfigError(
                    f"{str(folder)!r} holds a run of other settings ({difference}): use "
                    "another --out for this sweep"
                )
        planned.append((run, state))
    return planned


def read_sweep(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``DIR/sweep.json``: run name -> ``{"recipe", "overrides"}`` ({} when there is none)."""
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _record(out_dir: Path, recipe: str | Path, runs: Sequence[SweepRun]) -> None:
    known = read_sweep(out_dir)
    for run in runs:
        known[run.name] = {"recipe": str(recipe), "overrides": list(run.overrides)}
    atomic_write_text(out_dir / SWEEP_FILE, json.dumps(known, indent=2, sort_keys=True) + "\n")


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _one_line_error(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("nestedtrain:")]
    return (ours or lines or ["it exited without a message"])[-1]


def run_sweep(
    recipe: str | Path,
    runs: Sequence[SweepRun],
    out_dir: str | Path,
    jobs: int = 1,
    threads: int | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> list[RunOutcome]:
    """Train every unfinished run, ``jobs`` at a time, each in its own process.

    Args:
        recipe: the YAML recipe of every run.
        runs: from :func:`expand_grid`.
        out_dir: the sweep folder; run ``name`` trains into ``out_dir/name``, its output goes
            to ``out_dir/logs/name.log``.
        jobs: runs at a time.
        threads: CPU threads in all (default: the cores this process may use); each run gets
            ``threads // jobs`` of them, so that together they never exceed it.
        report: receives one line per event (a run started, finished, failed).

    Returns:
        One outcome per run, in the order of ``runs``; a failed run does not stop the others.

    Raises:
        ConfigError: bad ``jobs``, or what :func:`plan_sweep` raises (before anything runs).
    """
    out_dir = Path(out_dir)
    threads = _check_threads(jobs, threads)
    planned = plan_sweep(recipe, runs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _record(out_dir, recipe, runs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads // jobs)}
    outcomes = {run.name: RunOutcome(run, "done") for run, _ in planned}
    queue = [(run, state) for run, state in planned if state != "done"]
    for run, state in planned:
        if state == "done":
            report(f"{run.name}: finished before, skipped")
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    while queue or running:
        while queue and len(running) < jobs:
            run, state = queue.pop(0)
            running[run.name] = _start(recipe, run, state, out_dir, env)
            report(f"{run.name}: {'resumed' if state == 'resume' else 'started'}")
        time.sleep(0.2)
        for name, (process, start, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            outcome = outcomes[name]
            outcome.seconds = time.perf_counter() - start
            if process.returncode == 0:
                outcome.status = "trained"
                report(f"{name}: finished in {outcome.seconds:.0f} s")
            else:
                outcome.status, outcome.error = "failed", _one_line_error(log)
                report(f"{name}: failed (exit {process.returncode}): {outcome.error}")
    return [outcomes[run.name] for run in runs]


def _check_threads(jobs: int, threads: int | None) -> int:
    """The threads to use in all, once ``jobs`` and ``threads`` are known to fit the cores."""
    cores = _usable_cores()
    if threads is not None and not 1 <= threads <= cores:
        raise ConfigError(f"--threads {threads}: give 1 to {cores} (the CPU cores here)")
    threads = threads or cores
    if jobs < 1 or jobs > threads:
        raise ConfigError(
            f"--jobs {jobs}: give 1 to {threads} (the CPU threads to use), so that the runs' "
            "threads together never exceed them"
        )
    return threads


def _start(
    recipe: str | Path, run: SweepRun, state: str, out_dir: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, float, Path]:
    """Start ``nestedtrain train`` for ``run`` (``state``: new, resume or restart), its output
    to ``out_dir/logs/<name>.log``; the process, its start time and its log."""
    folder = out_dir / run.name
    if state == "restart":  # died before its first checkpoint: nothing to keep
        shutil.rmtree(folder)
    command = [sys.executable, "-m", "nestedtrain.cli"]
    command += train_command(recipe, run, out_dir)[1:]
    command += ["--resume"] if state == "resume" else []
    log = out_dir / "logs" / f"{run.name}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as f:
        process = subprocess.Popen(
            command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
        )
    return process, time.perf_counter(), log


def shell_command(words: Sequence[str]) -> str:
    """``words`` quoted for a POSIX shell."""
    return " ".join(shlex.quote(w) for w in words)
