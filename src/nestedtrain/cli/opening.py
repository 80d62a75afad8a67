"""Opening what a command analyses, evaluates or exports: a nestedtrain checkpoint or run
folder, or a model trained elsewhere (``--model NAME --weights FILE --data ...``).

The one opening that ``analyze``, ``eval``, ``select`` and ``export`` share, so that each
takes either kind the same way; ``nestedtrain.engine.foreign`` reads the weights files and
builds the recipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..data import build_data
from ..elastic.stages import find_stages
from ..engine.foreign import build_named_model, foreign_config, load_weights, read_weights
from ..errors import ConfigError
from .common import Checkpoint, open_checkpoint

__all__ = ["add_model_options", "open_foreign", "open_target"]


def add_model_options(
    parser: argparse.ArgumentParser, input_size: bool = True, data: bool = False
) -> None:
    """``--model/--weights/--pretrained`` (and ``--input-size/--mean/--std/--calib``): open a
    model trained elsewhere instead of a checkpoint; ``--data`` then says what to evaluate it
    on (declared here when ``data``, for commands without their own). ``input_size=False``
    where the command has its own ``--input-size``."""
    group = parser.add_argument_group(
        "a model trained elsewhere (instead of CHECKPOINT; --data: a recipe, dataset or "
        "imagefolder:PATH)"
    )
    if data:
        group.add_argument(
            "--data",
            metavar="DATA",
            help="with --model: a recipe (recipes/x.yaml), a dataset name or imagefolder:PATH",
        )
    group.add_argument(
        "--model",
        metavar="NAME",
        help="ours (resnet32), timm's (resnet50, resnet50.a1_in1k) or torchvision:NAME",
    )
    group.add_argument(
        "--weights",
        metavar="FILE",
        help="a state_dict, a timm or torchvision checkpoint, or a nestedtrain checkpoint",
    )
    group.add_argument(
        "--pretrained", action="store_true", help="let timm/torchvision fetch the weights"
    )
    if input_size:
        group.add_argument(
            "--input-size", type=int, metavar="S", help="evaluation side (default: timm's cfg)"
        )
    group.add_argument("--mean", metavar="M,M,M", help="normalisation mean per channel")
    group.add_argument("--std", metavar="S,S,S", help="normalisation std per channel")
    group.add_argument(
        "--calib", metavar="DIR", help="class folders to re-estimate BN from (image folders)"
    )


def open_target(
    args: argparse.Namespace, device: torch.device, positional: str, out: str | None = None
) -> Checkpoint:
    """The checkpoint ``args.<positional>`` names, or the model of ``--model``: one opening for
    every command that analyses, evaluates or exports a trained model. ``out``: where a
    foreign model's analyses go (default runs/analysis/<model>)."""
    path = getattr(args, positional, None)
    if getattr(args, "model", None) is None:
        if path is None:
            raise ConfigError(
                f"give a {positional.upper()} (a run folder or checkpoint), or --model NAME "
                "with --weights FILE (or --pretrained) and --data"
            )
        if getattr(args, "weights", None) is not None or getattr(args, "pretrained", False):
            raise ConfigError("--weights and --pretrained go with --model NAME")
        return open_checkpoint(path, device)
    if path is not None:
        raise ConfigError(
            f"{path!r} and --model {args.model}: give a checkpoint or a model, not both"
        )
    return open_foreign(args, device, out)


def open_foreign(
    args: argparse.Namespace, device: torch.device, out: str | None = None
) -> Checkpoint:
    """``--model`` with ``--weights`` or ``--pretrained``, built for the classes and channels
    of ``--data``; its stages found as training finds them.

    Raises:
        ConfigError: no weights named (or both), no --data, weights that do not fit, a model
            whose stages cannot be found (naming what to declare).
    """
    if (args.weights is None) == (not args.pretrained):
        raise ConfigError(
            f"--model {args.model}: give --weights FILE or --pretrained (one of the two)"
        )
    if args.data is None:
        raise ConfigError(
            f"--model {args.model} needs --data: a recipe (recipes/x.yaml), a dataset name "
            "(digits) or imagefolder:PATH"
        )
    state = read_weights(args.weights) if args.weights is not None else None
    cfg = foreign_config(
        args.model,
        args.data,
        input_size=getattr(args, "input_size", None),
        mean=_floats(args.mean, "--mean"),
        std=_floats(args.std, "--std"),
        calib=args.calib,
    )
    if getattr(args, "data_root", None) is not None:
        cfg.data.root = args.data_root
    data = build_data(
        OmegaConf.to_object(cfg.data), batch_size=cfg.batch_size, seed=cfg.seed, device=device
    )
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    model = build_named_model(args.model, data.num_classes, data.in_chans, args.pretrained, kwargs)
    if state is not None:
        load_weights(model, state, f"--weights {args.weights}")
    find_stages(model)  # a model without known stages: one line naming what to declare
    where = args.weights or f"{args.model} (pretrained)"
    folder = (
        Path(out) if out is not None else Path("runs", "analysis", args.model.replace(":", "-"))
    )
    info = {"num_classes": data.num_classes, "in_chans": data.in_chans, "epoch": None}
    return Checkpoint(Path(where), model.to(device).eval(), cfg, info, folder, data)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: write one number per channel, e.g. 0.485,0.456,0.406"
        ) from None
