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
the fastest after a warm-up round), and CT is also trained for as many epochs as that cost
buys (equal compute); after them, the sandwich rule's at the n chosen.

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

The study's commands, step costs and archive are in ``bench/results_runs.py``.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch

from nestedtrain.analysis.stats import format_mean_std, mean_std

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_runs import (  # noqa: E402 - the study's runs, beside this script
    ARCHIVE,
    CHECK,
    COST_ROUNDS,
    DROP_PATH_RATES,
    REPO,
    SANDWICH_NS,
    TUNE_FOLDS,
    TUNE_KS,
    Study,
    _archive_every,
    _command,
    _git_commit,
    _in_parallel,
    _run,
    _table,
    archive,
    measure_costs,
    measure_sandwich_cost,
    restore,
)

RECORD_START, RECORD_END = "<!-- check row:", "-->"


# --------------------------------------------------------------------------- document


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
        f"{_run_commits()} on {platform.machine()} ({os.cpu_count()} CPU cores, runs side by "
        f"side, one thread each, over several sessions: `docs/results/` keeps each finished "
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
        f"the validation split among {', '.join(SANDWICH_NS)}: **{found['n']}**; a step "
        f"of it costs {found['sandwich_cost']:.2f}× CT's (measured as above, side by side "
        "with CT, after the runs).",
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
        "The `wall s`, `images/s` and `cost × baseline` columns come from each run's wall "
        "time, which is not comparable here (runs of different sessions shared the 2 cores "
        "with different other work); the step costs above, measured side by side, are the "
        "costs.",
        "",
        "Per arm, against CT of the same seed (test split, chosen settings):",
        "",
        *_outcome(found["results"], args.epochs),
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
        "Per k, against CT of the same seed (base model against CT resnet20, motivated model "
        "against CT resnet32; test split):",
        "",
        *_motivation_outcome(out),
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


def _arm(label: dict, epochs: int) -> str:
    """A compare group's label in words: ``ST++, drop-path 0.05``, ``CT, 39 epochs``."""
    names = {"ct": "CT", "st": "ST (λ 1)", "stpp": "ST++", "sandwich": "sandwich"}
    words = [names.get(label["method"], label["method"])]
    if label.get("epochs") != str(epochs):
        words.append(f"{label['epochs']} epochs")
    if label.get("model.drop_path_rate", "0.0") != "0.0":
        words.append(f"drop-path {label['model.drop_path_rate']}")
    return ", ".join(words)


def _signed(stat: dict | None) -> str:
    """A paired difference as ``+0.93 ± 0.12``."""
    text = format_mean_std(stat)
    return text if text == "-" or text.startswith("-") else "+" + text


def _outcome(results: dict, epochs: int) -> list[str]:
    """One line per arm: its main network and sub-networks, the paired Δ to the baseline and
    in how many seeds the arm's main network beat the baseline's."""

    def by_seed(group: dict, key: str) -> dict:
        summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in group["runs"]]
        return {seed: s.get(key) for seed, s in zip(group["seeds"], summaries)}

    baseline = next(g for g in results["groups"] if g["label"] == results["baseline"])
    base_main = by_seed(baseline, "main_acc")
    lines = [
        f"- {_arm(baseline['label'], epochs)} (the baseline): main "
        f"{format_mean_std(baseline['main_acc'])}%, sub-networks "
        f"{format_mean_std(baseline.get('subnet_acc_mean'))}%"
    ]
    for group in results["groups"]:
        if group is baseline:
            continue
        main = by_seed(group, "main_acc")
        above = sum(main[s] > base_main[s] for s in main if s in base_main)
        lines.append(
            f"- {_arm(group['label'], epochs)}: main {format_mean_std(group['main_acc'])}% "
            f"(Δ {_signed(group.get('paired_main_acc'))}, above CT in {above} of "
            f"{len(main)} seeds), sub-networks {format_mean_std(group.get('subnet_acc_mean'))}% "
            f"(Δ {_signed(group.get('paired_subnet_acc_mean'))})"
        )
    return lines


def _by_seed(runs: list[str], key: str) -> dict[str, float]:
    """``{seed: summary[key]}`` of finished run folders named ``seed=N,...``."""
    found = {}
    for run in runs:
        seed = next(p for p in Path(run).name.split(",") if p.startswith("seed="))
        found[seed] = json.loads((Path(run) / "summary.json").read_text()).get(key)
    return found


def _paired_line(name: str, values: dict, baseline: dict) -> str:
    seeds = [s for s in values if s in baseline and values[s] is not None]
    diffs = [values[s] - baseline[s] for s in seeds]
    above = sum(d > 0 for d in diffs)
    return (
        f"{name} {format_mean_std(mean_std(values[s] for s in seeds))}% "
        f"(Δ {_signed(mean_std(diffs))}, above CT in {above} of {len(seeds)} seeds)"
    )


def _motivation_outcome(out: Path) -> list[str]:
    """One line per k: the base and the motivated model paired with the CT runs of their
    architectures (resnet20 and resnet32)."""
    ct20 = _by_seed(_runs_of(out / "ct_st", method="ct"), "main_acc")
    ct32 = _by_seed(_runs_of(out / "ct32"), "main_acc")
    runs = _runs_of(out / "motivation")
    ks = sorted(
        {
            p.split("=")[1]
            for r in runs
            for p in Path(r).name.split(",")
            if p.startswith("motivation.k=")
        }
    )
    lines = []
    for k in ks:
        of_k = _runs_of(out / "motivation", motivation__k=k)
        base = _paired_line("base", _by_seed(of_k, "base_acc"), ct20)
        motivated = _paired_line("motivated", _by_seed(of_k, "motivated_acc"), ct32)
        lines.append(f"- k {k}: {base}; {motivated}")
    return lines


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
    found["sandwich_cost"] = measure_sandwich_cost(out, args.train, found["n"])
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
