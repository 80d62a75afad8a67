"""The runs of ``bench/results.py``'s study: its commands, the step costs that set CT's
epochs at equal compute, and the archive of finished runs in ``docs/results/`` that carries the
study across sessions. ``bench/results.py`` runs them and writes docs/RESULTS.md from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]
DROP_PATH_RATES = ("0.05", "0.1")
SANDWICH_NS = ("1", "2")
TUNE_KS = "1,2,3"
TUNE_FOLDS = 3
COST_ROUNDS = 5
# the check row (bench/results.py --quick): a short ST++ run that goes through most of the step's code
CHECK = ["train", "recipes/fmnist_stpp.yaml", "model.name=resnet20", "data.train_subset=3000"]
CHECK += ["epochs=2", "eval.every=2", "eval.subnets=none", "model.drop_path_rate=0.1", "seed=0"]
ARCHIVE = REPO / "docs" / "results"
KEPT = (".json", ".jsonl", ".yaml")  # what a finished run leaves that compare and this read


def _run(args: list[str], cwd: Path = REPO) -> str:
    """``nestedtrain ARGS`` on one thread; its output, or SystemExit if it fails."""
    print("$ " + _command(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*NESTEDTRAIN, *args], capture_output=True, text=True, cwd=cwd, env=env)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"nestedtrain {args[0]} failed with exit status {done.returncode}")
    return done.stdout


# ---------------------------------------------------------------------------- archive
def _kept_files(out: Path) -> list[Path]:
    """The small files of the finished runs under ``out`` (relative paths), and the study's
    own json files; nothing of an unfinished run, no checkpoint."""
    kept = [p.relative_to(out) for p in out.glob("*.json")]
    for summary in out.rglob("summary.json"):
        run = summary.parent
        kept += [p.relative_to(out) for p in run.iterdir() if p.suffix in KEPT and p.is_file()]
    for record in [*out.rglob("sweep.json"), *out.rglob("tune_k.json"), *out.rglob("compare.json")]:
        kept.append(record.relative_to(out))
    return sorted(set(kept))


_ARCHIVE_LOCK = threading.Lock()


def archive(out: Path, archive_dir: Path = ARCHIVE) -> int:
    """Copy what the finished runs under ``out`` left into ``archive_dir``, each new run
    recorded with the commit this code is at; returns the number of files copied."""
    if not out.is_dir():
        return 0
    with _ARCHIVE_LOCK:
        return _archive(out, archive_dir)


def _archive(out: Path, archive_dir: Path) -> int:
    manifest_file = archive_dir / "commits.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    copied = 0
    for rel in _kept_files(out):
        source, target = out / rel, archive_dir / rel
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied += 1
        if rel.name == "summary.json":
            manifest[str(rel.parent)] = _git_commit()
    if copied:
        archive_dir.mkdir(parents=True, exist_ok=True)
        manifest_file.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return copied


def restore(out: Path, archive_dir: Path = ARCHIVE) -> int:
    """Copy the archived files that ``out`` lacks into it (so finished runs are skipped);
    returns how many."""
    if not archive_dir.is_dir():
        return 0
    restored = 0
    for source in archive_dir.rglob("*"):
        rel = source.relative_to(archive_dir)
        target = out / rel
        if source.is_file() and rel.name != "commits.json" and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            restored += 1
    return restored


def _archive_every(out: Path, seconds: float, stop: threading.Event) -> None:
    """Archive the finished runs every ``seconds`` until ``stop`` is set (a sweep's runs
    finish one by one inside one command)."""
    while not stop.wait(seconds):
        archive(out)


def _command(args: list[str]) -> str:
    return "nestedtrain " + " ".join(shlex.quote(a) for a in args)


def _in_parallel(*chains) -> None:
    """Run the chains (functions) side by side; re-raise the first failure."""
    failures: list[BaseException] = []

    def guarded(chain) -> None:
        try:
            chain()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread below
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(chain,)) for chain in chains]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


# ------------------------------------------------------------------------ step costs
def measure_costs(out: Path, train: int) -> dict[str, float]:
    """Seconds per training epoch of ST and ST++ over CT's, measured side by side (see
    :func:`_epoch_seconds`). Saved in ``out/costs.json`` and read from there on a rerun (so
    the equal-compute runs' commands stay the same)."""
    file = out / "costs.json"
    if file.exists():
        return json.loads(file.read_text())["relative"]
    st, stpp = "recipes/fmnist_st.yaml", "recipes/fmnist_stpp.yaml"
    arms = {"ct": (st, ["method=ct"]), "st": (st, ["method=st"]), "stpp": (stpp, ["method=stpp"])}
    epochs = _epoch_seconds(arms, train)
    seconds = {name: min(times[1:]) for name, times in epochs.items()}
    relative = {name: s / seconds["ct"] for name, s in seconds.items()}
    report = {"seconds_per_epoch": seconds, "relative": relative, "rounds": COST_ROUNDS}
    report["epoch_seconds"] = epochs
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(report, indent=2) + "\n")
    return relative


def measure_sandwich_cost(out: Path, train: int, n: str) -> float:
    """A sandwich step's cost over CT's at the chosen ``n``, measured side by side with CT
    as :func:`measure_costs` does (after the runs, when ``n`` is known) and added to
    ``out/costs.json``; read from there on a rerun."""
    file = out / "costs.json"
    report = json.loads(file.read_text())
    if report.get("sandwich", {}).get("n") == n:
        return report["sandwich"]["relative"]
    recipe = "recipes/fmnist_st.yaml"
    arms = {"ct": (recipe, ["method=ct"])}
    arms["sandwich"] = (recipe, ["method=sandwich", f"st.num_subnets={n}"])
    epochs = _epoch_seconds(arms, train)
    relative = min(epochs["sandwich"][1:]) / min(epochs["ct"][1:])
    report["sandwich"] = {"n": n, "relative": relative, "epoch_seconds": epochs}
    file.write_text(json.dumps(report, indent=2) + "\n")
    return relative


def _epoch_seconds(arms: dict[str, tuple[str, list[str]]], train: int) -> dict[str, list]:
    """Seconds of each of ``COST_ROUNDS`` training epochs of every arm (recipe, overrides)
    on resnet20 and ``train`` images: one thread, an epoch of each arm in turn. Callers take
    the fastest after the first round (warm-up): other work on the machine only ever adds
    time, so the minimum is the least disturbed."""
    import nestedtrain as nt
    from nestedtrain.engine.trainer import Trainer

    torch.set_num_threads(1)
    epochs: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, (recipe, overrides) in arms.items():
            overrides = [*overrides, "model.name=resnet20", f"data.train_subset={train}"]
            overrides += [f"epochs={COST_ROUNDS}", "eval.subnets=none"]
            trainers[name] = Trainer(nt.load_config(REPO / recipe, overrides), Path(tmp) / name)
        for epoch in range(COST_ROUNDS):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_epoch(epoch, progress=False)
                epochs[name].append(time.perf_counter() - start)
    return epochs


# ------------------------------------------------------------------------------ study
class Study:
    """The commands of the study, from the sizes asked for."""

    def __init__(self, args: argparse.Namespace, costs: dict[str, float]) -> None:
        out = self.out = Path(args.out)
        self.args, self.costs = args, costs
        self.seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))
        self.sizes = [f"epochs={args.epochs}", f"data.train_subset={args.train}"]
        self.common = ["model.name=resnet20", *self.sizes, f"eval.every={args.epochs}"]
        self.one = ["--jobs", "1", "--threads", "1"]
        st, stpp = "recipes/fmnist_st.yaml", "recipes/fmnist_stpp.yaml"
        self.ct_st = self._sweep(st, "ct_st", "+", "method=ct", "+", "method=st", "st.lam=1")
        self.stpp = self._sweep(stpp, "stpp")
        # CT for as many epochs as ST's and ST++'s measured step cost buys
        self.compute_epochs = {m: round(args.epochs * costs[m]) for m in ("st", "stpp")}
        epochs = ",".join(str(e) for e in self.compute_epochs.values())
        self.ct_compute = ["sweep", st, self.seeds, "model.name=resnet20", "method=ct"]
        self.ct_compute += [f"data.train_subset={args.train}", f"epochs={epochs}"]
        self.ct_compute += ["eval.every=1000", "--out", f"{out}/ct_compute", *self.one]
        rates = "model.drop_path_rate=" + ",".join(DROP_PATH_RATES)
        self.sd = self._sweep(st, "sd", "method=ct", rates)
        ns = "st.num_subnets=" + ",".join(SANDWICH_NS)
        self.sandwich = self._sweep(st, "sandwich", "method=sandwich", ns)
        self.stpp_sd = self._sweep(stpp, "stpp_sd", "model.drop_path_rate={rate}")
        # CT of the motivated model's architecture: the baseline of motivation's other model
        self.ct32 = ["sweep", st, self.seeds, "model.name=resnet32", *self.sizes]
        self.ct32 += [f"eval.every={args.epochs}", "method=ct", "eval.subnets=none"]
        self.ct32 += ["--out", f"{out}/ct32", *self.one]
        # motivation with the study's optimizer (the recipe's own is SGD without Nesterov), so
        # that the CT runs of resnet20 and resnet32 are its classical baselines
        mot = "recipes/motivation_fmnist_resnet20_32.yaml"
        mot_common = ["optim.name=sgd", f"data.train_subset={args.train}"]
        tune_epochs = max(1, args.epochs // 3)
        self.tune_k = ["tune-k", mot, *mot_common, f"epochs={tune_epochs}"]
        self.tune_k += [f"eval.every={tune_epochs}"]
        self.tune_k += ["--folds", str(TUNE_FOLDS), "--k", TUNE_KS, "--out", f"{out}/tune_k"]
        self.motivation = ["sweep", mot, self.seeds, *mot_common, f"epochs={args.epochs}"]
        self.motivation += [f"eval.every={args.epochs}", "motivation.k={ks}"]
        self.motivation += ["--out", f"{out}/motivation", *self.one]

    def _sweep(self, recipe: str, name: str, *grid: str) -> list[str]:
        command = ["sweep", recipe, self.seeds, *self.common, *grid]
        return [*command, "--out", f"{self.out}/{name}", *self.one]

    def chain_a(self) -> None:
        _run(self.ct_st)
        _run(self.stpp)
        _run(self.motivation_command())
        _run(self.ct_compute)  # last: its epochs come from costs.json, which may be remeasured

    def chain_b(self) -> None:
        _run(self.ct32)
        _run(self.sd)
        _run(self.sandwich)
        _run(self.stpp_sd_command())

    def best_k(self) -> int:
        report = self.out / "tune_k" / "tune_k.json"
        if not report.exists():
            _run(self.tune_k)
        return int(json.loads(report.read_text())["best_k"])

    def motivation_command(self) -> list[str]:
        ks = ",".join(sorted({"1", str(self.best_k())}))
        return [a.replace("{ks}", ks) for a in self.motivation]

    def stpp_sd_command(self) -> list[str]:
        rate = self.chosen("sd", "model.drop_path_rate")[0]
        return [a.replace("{rate}", rate) for a in self.stpp_sd]

    def chosen(self, sweep: str, field: str) -> tuple[str, str]:
        """The value of ``field`` with the best mean main accuracy on the validation split
        among the runs of ``sweep``, and the comparison's printed table."""
        out = self.out / f"compare_val_{sweep}"
        command = ["compare", str(self.out / sweep), "--by", field, "--split", "val"]
        printed = _run([*command, "--out", str(out)])
        groups = json.loads((out / "compare.json").read_text())["groups"]
        best = max(groups, key=lambda g: g["main_acc"]["mean"])
        return best["label"][field], _table(printed)


def _table(printed: str) -> str:
    return printed.split("\nwrote ")[0].rstrip()


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout

    done, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    return done.strip() + (" (with uncommitted changes in src)" if dirty else "")
