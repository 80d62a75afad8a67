"""docs/RESULTS.md: ST, ST++ and motivation against the baselines a reviewer asks for, on
Fashion-MNIST at the longest CPU schedule here.

    python bench/results.py [--out runs/results] [--seeds 3] [--epochs 30] [--train 3000]
    python bench/results.py --quick      # does main still give what RESULTS.md records?

One command, resumable: finished runs are skipped, interrupted ones resumed, so running it
again continues the study or only rewrites the document. The study takes longer than one
working session on a 2-core machine, so what a finished run leaves that the document reads
(``config.yaml``, ``summary.json``, ``metrics.jsonl``, ``sweep.json``, ``tune_k.json``, with
the commit it ran on) is kept in ``docs/results/`` as it finishes, and restored from there
into ``--out`` on the next start: commit it, and a fresh clone continues the study where it
stopped. ``--archive`` only copies the finished runs now. Every arm shares the model, data,
optimizer and schedule of ``recipes/fmnist_st.yaml`` (resnet20, SGD Nesterov lr 0.1 cosine)
but for the sizes given here, and evaluates the main network and 16 sampled sub-networks with
BN re-estimated for each. Before the runs, the cost of a training step of ST and ST++
relative to CT's is measured side by side in this process (one thread, interleaved epochs,
median), and CT is also trained for as many epochs as that cost buys (equal compute).

Two chains of runs go side by side, one thread each:

A. CT and ST (λ 1); ST++ (``recipes/fmnist_stpp.yaml``, λ 1/6 per sub-network);
   ``nestedtrain tune-k`` for motivation's k; motivation resnet20 -> resnet32 at the chosen k
   and at k 1; CT at ST's and at ST++'s compute.
B. CT of resnet32 (motivation's larger model); CT with stochastic depth at two rates; the
   sandwich rule at two n; ST++ with stochastic depth at the rate chosen for CT.

Settings (stochastic depth's rate, the sandwich's n, motivation's k) are chosen on the
validation split (10% of the training split, held out before the subset is drawn) or by
tune-k's folds; the test split is read once, for the chosen settings.

``--quick`` reruns the study's check row (one seed of a short ST++ run with stochastic depth,
which goes through the shared-prefix step, KL⁻, resized inputs and drop-path) and says whether
its main accuracy and loss equal what RESULTS.md records: exactly, on the same machine and
thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]
DROP_PATH_RATES = ("0.05", "0.1")
SANDWICH_NS = ("1", "2")
TUNE_KS = "1,2,3"
TUNE_FOLDS = 3
COST_ROUNDS = 5
# the check row: a short ST++ run that goes through most of the step's code
CHECK = ["train", "recipes/fmnist_stpp.yaml", "model.name=resnet20", "data.train_subset=3000"]
CHECK += ["epochs=2", "eval.every=2", "eval.subnets=none", "model.drop_path_rate=0.1", "seed=0"]
RECORD_START, RECORD_END = "<!-- check row:", "-->"
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
    """Seconds per training epoch of ST and ST++ over CT's, measured side by side: one
    thread, an epoch of each in turn, the first round warm-up, the fastest of the rest (other
    work on the machine only ever adds time, so the minimum is the least disturbed).
    Saved in ``out/costs.json`` and read from there on a rerun (so the equal-compute runs'
    commands stay the same)."""
    file = out / "costs.json"
    if file.exists():
        return json.loads(file.read_text())["relative"]
    import nestedtrain as nt
    from nestedtrain.engine.trainer import Trainer

    torch.set_num_threads(1)
    arms = {"ct": "recipes/fmnist_st.yaml", "st": "recipes/fmnist_st.yaml"}
    arms["stpp"] = "recipes/fmnist_stpp.yaml"
    epochs: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, recipe in arms.items():
            overrides = [f"method={name}", "model.name=resnet20", f"data.train_subset={train}"]
            overrides += [f"epochs={COST_ROUNDS}", "eval.subnets=none"]
            trainers[name] = Trainer(nt.load_config(REPO / recipe, overrides), Path(tmp) / name)
        for epoch in range(COST_ROUNDS):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_epoch(epoch, progress=False)
                epochs[name].append(time.perf_counter() - start)
    seconds = {name: min(times[1:]) for name, times in epochs.items()}
    relative = {name: s / seconds["ct"] for name, s in seconds.items()}
    report = {"seconds_per_epoch": seconds, "relative": relative, "rounds": COST_ROUNDS}
    report["epoch_seconds"] = epochs
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(report, indent=2) + "\n")
    return relative


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


# --------------------------------------------------------------------------- document
def _table(printed: str) -> str:
    return printed.split("\nwrote ")[0].rstrip()


def _block(*lines: str) -> list[str]:
    return ["```", *lines, "```"]


def _runs_of(folder: Path, **fields: str) -> list[str]:
    """The finished run folders in ``folder`` whose names hold every ``field=value``."""
    wanted = [f"{k.replace('__', '.')}={v}" for k, v in fields.items()]
    runs = [p for p in folder.iterdir() if (p / "summary.json").is_file()]
    return sorted(str(p) for p in runs if all(w in p.name.split(",") for w in wanted))


def report(study: Study) -> dict:
    """The comparisons, on validation for the choices and on test for the chosen settings."""
    out = study.out
    rate, sd_val = study.chosen("sd", "model.drop_path_rate")
    n, sandwich_val = study.chosen("sandwich", "st.num_subnets")
    test_runs = [*_runs_of(out / "ct_st"), str(out / "stpp"), str(out / "ct_compute")]
    test_runs += _runs_of(out / "sd", model__drop_path_rate=rate)
    test_runs += [str(out / "stpp_sd"), *_runs_of(out / "sandwich", st__num_subnets=n)]
    test = ["compare", *test_runs, "--by", "method,epochs,model.drop_path_rate"]
    test += ["--baseline", f"method=ct,epochs={study.args.epochs},model.drop_path_rate=0.0"]
    test += ["--out", f"{out}/compare_test"]
    printed_test = _run(test)
    ct20 = _runs_of(out / "ct_st", method="ct")
    mot = ["compare", *ct20, f"{out}/ct32", f"{out}/motivation"]
    mot += ["--by", "method,model.name,motivation.k"]
    mot += ["--baseline", "method=ct,model.name=resnet20,motivation.k=2"]
    mot += ["--out", f"{out}/compare_motivation"]
    printed_mot = _run(mot)
    return {
        "rate": rate,
        "n": n,
        "val": {"sd": sd_val, "sandwich": sandwich_val},
        "test": (test, _table(printed_test)),
        "mot": (mot, _table(printed_mot)),
        "results": json.loads((out / "compare_test" / "compare.json").read_text()),
    }


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout

    done, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    return done.strip() + (" (with uncommitted changes in src)" if dirty else "")


def _run_commits() -> str:
    manifest = ARCHIVE / "commits.json"
    commits = set(json.loads(manifest.read_text()).values()) if manifest.exists() else set()
    return ", ".join(sorted(commits)) or _git_commit()


def _document(args, study: Study, found: dict, check: dict) -> list[str]:
    out = study.out
    versions = f"torch {torch.__version__}, timm {timm.__version__}, Python "
    versions += platform.python_version()
    tune = json.loads((out / "tune_k" / "tune_k.json").read_text())
    per_k = ", ".join(
        f"k={r['k']}: base {r['base_val_acc']:.2f} ± {r['base_val_acc_std']:.2f}%"
        for r in tune["per_k"]
    )
    summaries = list(out.glob("*/*/summary.json")) + list(out.glob("tune_k/*/*/summary.json"))
    minutes = sum(json.loads(p.read_text()).get("wall_seconds", 0.0) for p in summaries) / 60
    costs = json.loads((out / "costs.json").read_text())
    e_st, e_stpp = study.compute_epochs["st"], study.compute_epochs["stpp"]
    return [
        "# Results at CPU scale",
        "",
        f"Written by `python bench/results.py --seeds {args.seeds} --epochs {args.epochs} "
        f"--train {args.train}` at commit {_git_commit()} from runs made at commit "
        f"{_run_commits()} on {platform.machine()} ({os.cpu_count()} CPU cores, two runs at a "
        f"time, one thread each, over several sessions: `docs/results/` keeps each finished "
        f"run's records and `commits.json` the commit of each); {versions}. The runs' wall "
        f"times add up to {minutes:.0f} minutes; they shared the machine with other work, so "
        "only the step costs below, measured side by side, are timings.",
        "",
        f"Fashion-MNIST, resnet20, {args.train} training images (a seeded subset; 10% of the "
        "training split held out before it as the validation split), the 10,000 test images, "
        f"{args.epochs} epochs, SGD (Nesterov) lr 0.1 cosine, weight decay 5e-4, batch 128, "
        f"{args.seeds} seeds. Mean ± sample standard deviation over seeds; Δ is the paired "
        "difference to CT's run of the same seed. Settings were chosen on the validation "
        "split; the test split is shown for the chosen settings only. Sub-networks: 16 "
        "sampled ordered ones, BN re-estimated for each.",
        "",
        "## 1. The main network and its sub-networks against CT, equal compute, stochastic "
        "depth and the sandwich rule",
        "",
        "- **CT at equal compute**: a step of ST costs "
        f"{costs['relative']['st']:.2f}× CT's and one of ST++ {costs['relative']['stpp']:.2f}× "
        f"(measured side by side: {COST_ROUNDS} interleaved epochs on "
        f"{args.train} images, one thread, the fastest of the last {COST_ROUNDS - 1}; "
        "`runs/results/costs.json`), so CT also trains for "
        f"{e_st} and {e_stpp} epochs (its cosine schedule stretched to them).",
        f"- **Stochastic depth** (`model.drop_path_rate`, linear in depth): rate chosen on the "
        f"validation split among {', '.join(DROP_PATH_RATES)}: **{found['rate']}**; ST++ with "
        "stochastic depth uses it too.",
        "- **Sandwich rule** (`method=sandwich`: the smallest and n random sub-networks a step, "
        "each distilled from the main network's detached output, KL weight 1 each): n chosen on "
        f"the validation split among {', '.join(SANDWICH_NS)}: **{found['n']}**.",
        "- ST is λ 1 (chosen on this validation split among 1 and 5 in the study this one "
        "replaces); ST++ is `recipes/fmnist_stpp.yaml` (λ 1/6 per sub-network, "
        "docs/stpp_lambda.md).",
        "",
        "Validation split (the choices):",
        "",
        *_block(_command(study.sd), _command(study.sandwich)),
        "",
        *_block(found["val"]["sd"], "", found["val"]["sandwich"]),
        "",
        "Test split, chosen settings (`cost × baseline`: epochs ÷ training images/s, over CT's):",
        "",
        *_block(
            *(_command(c) for c in (study.ct_st, study.stpp, study.ct_compute)),
            _command(study.stpp_sd_command()),
            _command(found["test"][0]),
        ),
        "",
        *_block(found["test"][1]),
        "",
        "## 2. Motivation training resnet20 → resnet32",
        "",
        f"k chosen by `nestedtrain tune-k` ({TUNE_FOLDS} folds of the training images, k "
        f"{TUNE_KS}, {max(1, args.epochs // 3)} epochs - a third of the schedule, to fit the "
        f"machine; the paper uses 5 folds): {per_k} → **k {tune['best_k']}**; k 1 is run as "
        "well. The motivated model is evaluated and saved with BN statistics re-estimated "
        "from 2,000 training images (its buffers are the base model's); `motivated_acc_raw` "
        "is without. Baselines: section 1's CT runs of resnet20 and CT runs of resnet32 (same "
        "optimizer, schedule and seeds).",
        "",
        *_block(
            _command(study.tune_k),
            _command(study.motivation_command()),
            _command(study.ct32),
            _command(found["mot"][0]),
        ),
        "",
        *_block(found["mot"][1]),
        "",
        *_motivated(out / "motivation"),
        "",
        "## 3. The check row",
        "",
        "`python bench/results.py --quick` reruns this and says whether main still gives it "
        "(exactly, on the same machine and thread count):",
        "",
        *_block(_command(CHECK)),
        "",
        f"main {check['main_acc']!r}% top-1 on test, last epoch's loss {check['loss']!r}.",
        "",
        f"{RECORD_START} {json.dumps(check)} {RECORD_END}",
    ]


def _motivated(folder: Path) -> list[str]:
    """Per run: the motivated model's test accuracy with re-estimated and with the base
    model's BN statistics, and the share of motivated steps."""
    rows = ["| run | motivated % | motivated %, raw BN | motivated steps |", "|---|---|---|---|"]
    for summary_file in sorted(folder.glob("*/summary.json")):
        s = json.loads(summary_file.read_text())
        steps = s.get("motivated_steps", 0) + s.get("base_steps", 0)
        share = s.get("motivated_steps", 0) / steps if steps else 0.0
        rows.append(
            f"| {summary_file.parent.name} | {s.get('motivated_acc', float('nan')):.2f} | "
            f"{s.get('motivated_acc_raw', float('nan')):.2f} | {share:.1%} |"
        )
    return rows


# ------------------------------------------------------------------------- check row
def run_check(folder: Path) -> dict:
    """The check row trained into ``folder``: its main accuracy and last epoch's loss."""
    _run([*CHECK, "--out", str(folder)])
    summary = json.loads((folder / "summary.json").read_text())
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "main_acc": summary["main_acc"],
        "loss": last["loss"],
        "machine": platform.machine(),
        "threads": 1,
        "torch": torch.__version__,
    }


def quick(doc: Path) -> int:
    """Rerun the check row; 0 if it gives what ``doc`` records, 1 if not."""
    text = doc.read_text() if doc.exists() else ""
    if RECORD_START not in text:
        print(f"{doc} records no check row: run python bench/results.py first")
        return 2
    recorded = json.loads(text.split(RECORD_START, 1)[1].split(RECORD_END, 1)[0])
    with tempfile.TemporaryDirectory() as tmp:
        now = run_check(Path(tmp) / "check")
    same = all(now[k] == recorded[k] for k in ("main_acc", "loss"))
    print(f"recorded: main {recorded['main_acc']!r}%, loss {recorded['loss']!r}")
    print(f"now:      main {now['main_acc']!r}%, loss {now['loss']!r}")
    if same:
        print("same: main still gives what RESULTS.md records")
        return 0
    where = [k for k in ("machine", "torch") if now[k] != recorded[k]]
    why = f" (another {', '.join(where)}: exact equality is not expected)" if where else ""
    print(f"DIFFERS: a change since RESULTS.md moved the numbers{why}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--doc", default=str(REPO / "docs" / "RESULTS.md"))
    parser.add_argument("--quick", action="store_true", help="rerun the check row only")
    parser.add_argument(
        "--archive", action="store_true", help=f"copy the finished runs into {ARCHIVE} only"
    )
    args = parser.parse_args()
    if args.quick:
        return quick(Path(args.doc))
    out = Path(args.out)
    if args.archive:
        print(f"archived {archive(out)} files into {ARCHIVE}")
        return 0
    print(f"restored {restore(out)} files of finished runs from {ARCHIVE}", flush=True)
    study = Study(args, measure_costs(out, args.train))
    archive(out)
    start, stop = time.time(), threading.Event()
    watcher = threading.Thread(target=_archive_every, args=(out, 60.0, stop), daemon=True)
    watcher.start()
    try:
        _in_parallel(study.chain_a, study.chain_b)
    finally:
        stop.set()
        archive(out)
    print(f"runs took {(time.time() - start) / 60:.0f} minutes this time", flush=True)
    found = report(study)
    check_file = study.out / "check.json"
    if not check_file.exists():
        check_file.write_text(json.dumps(run_check(study.out / "check"), indent=2) + "\n")
    check = json.loads(check_file.read_text())
    archive(out)
    Path(args.doc).write_text("\n".join(_document(args, study, found, check)) + "\n")
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
