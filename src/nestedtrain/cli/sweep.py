"""``nestedtrain sweep`` and ``nestedtrain compare``: many seeds and settings, one table.

The work is done by :mod:`nestedtrain.engine.sweep` and :mod:`nestedtrain.analysis.compare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.compare import (
    SPLITS,
    compare_rows,
    compare_runs,
    parse_baseline,
    write_comparison,
)
from ..engine.sweep import expand_grid, plan_sweep, run_sweep, shell_command, train_command
from .common import add_command, add_recipe_arguments, command_line, positive, table

__all__ = ["register"]


# ------------------------------------------------------------------------------- parser
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``compare``."""
    p = add_command(
        subparsers,
        "sweep",
        cmd_sweep,
        help="train the cross product of override values, one run folder each",
        description=(
            "Train a recipe for every combination of the comma-separated override values "
            "(key=v1,v2); a plain key=value applies to every run. Finished runs are skipped "
            "and interrupted ones resumed, so the same command continues a sweep."
        ),
    )
    add_recipe_arguments(p, "key=value or key=v1,v2,... e.g. seed=0,1,2")
    p.add_argument("--out", required=True, help="the sweep folder; one run folder per setting")
    p.add_argument(
        "--jobs",
        type=positive(int, "number of runs", "a whole number >= 1, e.g. 4"),
        default=1,
        help="runs at a time; the CPU threads are divided between them (at most the cores)",
    )
    p.add_argument(
        "--threads",
        type=positive(int, "number of threads", "a whole number >= 1, e.g. 8"),
        default=None,
        help="CPU threads for all runs together (default: every core here)",
    )
    p.add_argument(
        "--print",
        action="store_true",
        help="print one `nestedtrain train` command per run instead (for a cluster job array)",
    )

    p = add_command(
        subparsers,
        "compare",
        cmd_compare,
        help="group finished runs and compare them: mean ± std over seeds, plots",
    )
    p.add_argument("runs", nargs="+", help="run folders, or sweep folders holding them")
    p.add_argument(
        "--by",
        help="recipe fields to group by, e.g. method,model.name (default: every sweep "
        "override that differs between runs, except seed)",
    )
    p.add_argument(
        "--baseline", help="the group to take paired differences against, e.g. method=ct"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=SPLITS,
        help="the main network's accuracy on: test (default), or val - the validation split "
        "only, to choose settings without reading the test split",
    )
    p.add_argument("--out", help="where to write compare.md/json and plots (default: RUN/compare)")


def cmd_sweep(args: argparse.Namespace) -> int:
    runs = expand_grid(args.overrides)
    if args.print:
        plan_sweep(args.recipe, runs, args.out)  # every run's recipe must resolve
        for run in runs:
            print(shell_command(train_command(args.recipe, run, args.out)))
        return 0
    print(f"sweep: {len(runs)} runs into {args.out}, {args.jobs} at a time", flush=True)
    outcomes = run_sweep(
        args.recipe,
        runs,
        args.out,
        jobs=args.jobs,
        threads=args.threads,
        report=lambda line: print(line, flush=True),
    )
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("trained", "done", "failed")}
    print(
        f"sweep done: {counts['trained']} trained, {counts['done']} finished before, "
        f"{counts['failed']} failed"
    )
    for outcome in failed:
        print(f"  failed {outcome.run.name}: {outcome.error}")
    if failed:
        print(f"(each run's output is in {Path(args.out) / 'logs'})")
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    result = compare_runs(
        args.runs, by=by, baseline=parse_baseline(args.baseline), split=args.split
    )
    out = Path(args.out) if args.out else Path(args.runs[0]) / "compare"
    for header, rows in compare_rows(result):
        print(table(header, rows))
        print()
    files = write_comparison(result, out, command_line(args))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
