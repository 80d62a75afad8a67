"""``nestedtrain analyze ...`` and ``nestedtrain report``: their arguments.

Each analysis of checkpoints takes CHECKPOINT (or ``--model``), its own options, the cache
options when it caches shared prefixes, and the data and device options;
:mod:`.analysis_handlers` runs it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..analysis.destruct import BN_POLICIES
from ..analysis.lesion import LESION_BN
from ..evaluation import DEFAULT_MEMORY_MB
from .analysis_handlers import (
    cmd_destruct,
    cmd_erf,
    cmd_kl_drift,
    cmd_lesion,
    cmd_logits,
    cmd_matrix,
    cmd_report,
    cmd_subnets,
)
from .common import Handler, add_command, add_memory_option, add_seed_option
from .opening import add_model_options

__all__ = ["register"]


# ------------------------------------------------------------------------------- options
def _chunk_options(parser: argparse.ArgumentParser) -> None:
    """``--memory-mb`` and ``--chunk-images``: where an analysis caches activations of shared
    prefixes."""
    add_memory_option(parser, DEFAULT_MEMORY_MB, str(DEFAULT_MEMORY_MB))
    parser.add_argument(
        "--chunk-images",
        type=int,
        metavar="N",
        help="chunks of at most N images (evaluation batches split to fit) instead of --memory-mb",
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    """The data and device options every analysis of checkpoints takes."""
    group = parser.add_argument_group("data and device")
    group.add_argument(
        "--data",
        metavar="DATA",
        help="evaluate on this dataset or imagefolder:PATH (default: the run's); with --model "
        "also a recipe (recipes/x.yaml)",
    )
    group.add_argument("--data-root", metavar="DIR", help="dataset root (default: the run's)")
    group.add_argument(
        "--split", choices=("test", "val"), default="test", help="evaluation split (default: test)"
    )
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="evaluation and calibration batch (default: the run's eval.batch_size)",
    )
    group.add_argument(
        "--calib-images",
        type=int,
        metavar="N",
        help="training images for BN re-calibration (default: the run's data.calib_images)",
    )
    group.add_argument(
        "--out",
        metavar="DIR",
        help="write here instead of RUN/analysis/<what>/ (with --model: DIR/analysis/<what>/, "
        "DIR by default runs/analysis/<model>)",
    )


def _subnets_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--space",
        default="full",
        help="full (default), space3, or most blocks each stage may drop: N or 0,1,3,0",
    )
    parser.add_argument(
        "--sample", type=int, metavar="M", help="evaluate a seeded sample of M sub-networks"
    )
    add_seed_option(parser, "the sample")
    parser.add_argument(
        "--individual",
        nargs="+",
        metavar="CKPT",
        help="individually trained models of sub-network shapes to compare with",
    )


def _destruct_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k", default="1,2,3", help="numbers of blocks to delete together (default 1,2,3)"
    )
    parser.add_argument(
        "--permute-k", help="numbers of transpositions per permutation (default: --k; '' for none)"
    )
    parser.add_argument(
        "--max-combinations",
        type=int,
        default=1000,
        metavar="N",
        help="evaluate a seeded sample of N combinations per k when there are more "
        "(default 1000; 0: all)",
    )
    add_seed_option(parser, "the samples")
    parser.add_argument(
        "--bn",
        choices=BN_POLICIES,
        default="recalibrate",
        help="recalibrate: BN statistics re-estimated for each network (default, as the "
        "paper); own: the trained ones",
    )
    parser.add_argument(
        "--swap",
        nargs="+",
        metavar="S:I:J",
        help="also evaluate swapping blocks I and J of stage S",
    )
    parser.add_argument("--stages", help="destroy only these stages, numbered from 1 (e.g. 1,3)")


def _lesion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k",
        default="all",
        help="numbers of blocks to delete together: all (default: 1 up to all that can go) or 1,2,4",
    )
    parser.add_argument(
        "--random",
        type=int,
        default=10,
        metavar="N",
        help="random draws of k blocks per k (default 10; 0: none)",
    )
    add_seed_option(parser, "the draws")
    parser.add_argument(
        "--bn",
        default=",".join(LESION_BN),
        help="BN statistics: own (the trained ones), recalibrate (re-estimated per lesioned "
        "network from training images) or both (default own,recalibrate)",
    )
    parser.add_argument(
        "--norm-images",
        type=int,
        default=1024,
        metavar="N",
        help="evaluation images for the residual-branch ratios (default 1024)",
    )


def _erf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subnet", help="analyse this sub-network (BN re-calibrated), e.g. 3-2-4")
    parser.add_argument(
        "--input-size",
        type=int,
        metavar="S",
        help="resize images to SxS (default: the evaluation size)",
    )
    parser.add_argument(
        "--images", type=int, default=64, metavar="N", help="number of images (default 64)"
    )


def _add_analysis(
    which: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    *,
    help: str,
    description: str,
    many: bool = False,
    chunked: bool = True,
) -> None:
    """Declare ``analyze NAME`` of trained checkpoints: CHECKPOINT (``many``: one or more),
    the analysis's own ``options``, the cache options when ``chunked``, then the data
    options."""
    p = add_command(which, name, handler, help=help, description=description)
    if many:
        p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT")
    else:
        p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    if options is not None:
        options(p)
    if chunked:
        _chunk_options(p)
    _data_options(p)
    add_model_options(p, input_size=name != "erf")  # erf has its own --input-size


# ``analyze NAME`` of trained checkpoints, in the order ``--help`` lists them: the keywords of
# _add_analysis. kl-drift (None) reads a run's records instead.
_ANALYSES: dict[str, dict[str, Any] | None] = {
    "subnets": {
        "handler": cmd_subnets,
        "options": _subnets_options,
        "help": "accuracy of every ordered sub-network (BN re-calibrated)",
        "description": "Accuracy of every sub-network of an ordered sampling space, each with "
        "BN statistics re-estimated for it; sub-networks that share blocks share their "
        "computation.",
    },
    "matrix": {
        "handler": cmd_matrix,
        "many": True,
        "help": "loafing matrix: each architecture run inside each trained model",
        "description": "Rows: trained models; columns: their architectures run inside them "
        "(ResNets: ordered sub-networks; DenseNets: inherited weights), BN re-calibrated; the "
        "diagonal is each model's own accuracy.",
    },
    "destruct": {
        "handler": cmd_destruct,
        "options": _destruct_options,
        "help": "accuracy drop when deleting or permuting blocks",
        "description": "Accuracy drop when deleting each skippable block, deleting k of them, "
        "or permuting blocks within a stage by k transpositions (ST paper, Fig. 6).",
    },
    "lesion": {
        "handler": cmd_lesion,
        "options": _lesion_options,
        "help": "lesion curves: delete single blocks, then the worst/best/random k, with own "
        "and re-estimated BN; residual-branch norms",
        "description": "Does the model loaf, and where? The accuracy after deleting each "
        "block, then k blocks (the k whose single deletion costs most, least, and random "
        "draws), with the trained BN statistics and with BN re-estimated; and per block the "
        "ratio of its residual branch to its skip path on evaluation images.",
    },
    "kl-drift": None,
    "logits": {
        "handler": cmd_logits,
        "many": True,
        "chunked": False,
        "help": "mean L2 norm of the logits and top-1, per model",
        "description": "Logit amplitude (mean L2 norm over the dataset) and top-1 of one model "
        "or a family of models (ST++, Fig. 4).",
    },
    "erf": {
        "handler": cmd_erf,
        "options": _erf_options,
        "chunked": False,
        "help": "effective receptive field heat map",
        "description": "Gradient of the centre unit of the last feature map (summed over "
        "channels) with respect to the input; absolute value summed over channels, mean over "
        "images.",
    },
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` (subnets, matrix, destruct, lesion, kl-drift, logits, erf) and
    ``report``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="loafing analyses of trained models",
        description="Loafing analyses of trained checkpoints. A CHECKPOINT is a .pt file of "
        "`nestedtrain train` or its run folder (then checkpoints/last.pt); or name a model "
        "trained elsewhere: --model NAME --weights FILE --data RECIPE|DATASET|imagefolder:PATH.",
    )
    which = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for name, keywords in _ANALYSES.items():
        if keywords is None:
            _register_kl_drift(which)
        else:
            _add_analysis(which, name, **keywords)
    _register_report(subparsers)


def _register_kl_drift(which: argparse._SubParsersAction) -> None:
    """``analyze kl-drift``: it reads a run folder's records, not a checkpoint."""
    p = add_command(
        which,
        "kl-drift",
        cmd_kl_drift,
        help="KL(main || sub-network) over training, from a run's records",
        description="Box plots per recorded epoch of KL(main || sub-network), from "
        "RUN/analysis/kl_drift.jsonl (train with analysis.kl_drift_every=E).",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/kl-drift/")


def _register_logits(which: argparse._SubParsersAction) -> None:
    """``analyze logits``."""
    _add_analysis(
        which,
        "logits",
        cmd_logits,
        many=True,
        chunked=False,
        help="mean L2 norm of the logits and top-1, per model",
        description="Logit amplitude (mean L2 norm over the dataset) and top-1 of one model or a "
        "family of models (ST++, Fig. 4).",
    )


def _register_erf(which: argparse._SubParsersAction) -> None:
    """``analyze erf``."""
    _add_analysis(
        which,
        "erf",
        cmd_erf,
        _erf_options,
        chunked=False,
        help="effective receptive field heat map",
        description="Gradient of the centre unit of the last feature map (summed over channels) "
        "with respect to the input; absolute value summed over channels, mean over images.",
    )


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    """``report``, a top-level command beside ``analyze``."""
    p = add_command(
        subparsers,
        "report",
        cmd_report,
        help="write RUN/report.md and a self-contained RUN/report.html",
        description="One Markdown file and one self-contained HTML page for a run folder: "
        "configuration, training curves, sub-network statistics and every analysis.",
    )
    p.add_argument("run", metavar="RUN")
