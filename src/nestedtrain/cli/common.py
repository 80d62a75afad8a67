"""What the command groups share: the parser, one-line errors, options several commands take,
the table printer, the recorded command line, and a checkpoint opened with its data.

Library code raises; the CLI alone prints and sets exit statuses. Bad input is one line on
stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data import Data, build_data
from ..engine.build import load_model
from ..engine.checkpoint import resolve_checkpoint
from ..errors import ConfigError

__all__ = [
    "BAD_INPUT",
    "Checkpoint",
    "Handler",
    "Parser",
    "UsageError",
    "add_command",
    "add_recipe_arguments",
    "batch_size",
    "checkpoint_data",
    "command_line",
    "fmt",
    "open_checkpoint",
    "output_folder",
    "parse_ints",
    "parse_space",
    "positive",
    "run",
    "table",
]

Handler = Callable[[argparse.Namespace], int]
Number = TypeVar("Number", int, float)

# The exceptions that mean "the user's input is wrong": one line on stderr, exit status 2.
# The library raises ConfigError for bad input; a missing file the user named is the other.
# Every other exception is a bug and propagates with its traceback.
BAD_INPUT: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


# ------------------------------------------------------------------------ parsing, running
class UsageError(Exception):
    """A command line argparse could not read."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (:class:`UsageError`), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def add_command(
    subparsers: argparse._SubParsersAction, name: str, handler: Handler, **kwargs: Any
) -> argparse.ArgumentParser:
    """Declare the sub-command ``name``, run by ``handler(args) -> exit status``.

    ``kwargs`` go to ``add_parser`` (help, description, ...); add the options to the parser
    returned. Everything a handler records about its command line comes from this parser
    (:func:`command_line`), so an option is declared once.
    """
    parser = subparsers.add_parser(name, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def run(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run its handler and return the exit status; the one place where the
    CLI turns exceptions into one-line messages."""
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
        return int(args.handler(args) or 0)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except BAD_INPUT as err:
        print(f"nestedtrain: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestedtrain: interrupted", file=sys.stderr)
        return 130


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- shared options
def positive(kind: Callable[[str], Number], what: str, hint: str) -> Callable[[str], Number]:
    """An argparse ``type=``: the text read as ``kind`` (``int`` or ``float``) and refused
    unless > 0, as "'TEXT' is no WHAT: give HINT"."""

    def read(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # not a number: refused below with the same message
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is no {what}: give {hint}")
        return value

    return read


def add_seed_option(parser: argparse.ArgumentParser, of: str) -> None:
    """``--seed N`` (default 0), the one declaration of the option: the seed ``of`` what."""
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {of} (default 0)")


def add_memory_option(parser: argparse.ArgumentParser, default: float | None, said: str) -> None:
    """``--memory-mb MB``, the one declaration of the option: how many MiB of activations a
    sub-network evaluation caches at a time (``said``: its default, in words)."""
    parser.add_argument(
        "--memory-mb",
        type=positive(float, "memory budget", "MiB > 0, e.g. 512"),
        default=default,
        metavar="MB",
        help="cache at most about MB MiB of activations at a time: images run in chunks "
        f"sized to fit; results do not change (default {said})",
    )


def add_recipe_arguments(
    parser: argparse.ArgumentParser, overrides: str, recipe: str = "YAML recipe (see recipes/)"
) -> None:
    """The positional RECIPE and its ``key=value`` OVERRIDES; the strings are their help."""
    parser.add_argument("recipe", help=recipe)
    parser.add_argument("overrides", nargs="*", help=overrides)


# ---------------------------------------------------------------- the recorded command line
def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces ``args``, as the JSON of an analysis records it.

    Rebuilt from the parser that read ``args``: the command words, the positional arguments,
    then every option whose value differs from its default (in the order declared).
    """
    parser: argparse.ArgumentParser = args.root_parser  # set by cli.build_parser
    words = ["nestedtrain"]
    while (subcommands := _subcommands(parser)) is not None:
        words.append(getattr(args, subcommands.dest))
        parser = subcommands.choices[words[-1]]
    positionals: list[str] = []
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            positionals += _words(value)
        elif value != action.default:
            flag = max(action.option_strings, key=len)  # the long form
            options += [flag] if action.nargs == 0 else [flag, *_words(value)]
    return shlex.join(words + positionals + options)


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [w for v in value for w in _words(v)]
    if isinstance(value, float):
        short = f"{value:g}"  # 512 rather than 512.0, unless that loses digits
        return [short if float(short) == value else repr(value)]
    return [str(value)]


# ---------------------------------------------------------------------------------- tables
def fmt(value: Any, digits: int = 2) -> str:
    """A number as text: ``-`` for None, a float with ``digits`` decimals, else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any) -> str:
    # below 0.1 two decimals say too little (a KL of 0.0042 is not 0.00)
    if isinstance(value, float) and value != 0 and abs(value) < 0.1:
        return f"{value:.3g}"
    return fmt(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The CLI's one table layout: right-aligned columns two spaces apart, a rule under the
    header; floats with two decimals (three significant digits below 0.1), None as ``-``."""
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    """A trained model with its recipe, the checkpoint's contents and its run folder."""

    path: Path
    model: nn.Module
    cfg: DictConfig
    state: dict[str, Any]
    run: Path | None  # RUN for RUN/checkpoints/x.pt (RUN holding config.yaml), else None
    # A model trained elsewhere (--model): the data it was opened with; ``run`` is then the
    # folder its analyses go to (--out, default runs/analysis/<model>).
    data: Data | None = None

    @property
    def foreign(self) -> bool:
        """Opened with --model, not from a nestedtrain checkpoint."""
        return self.data is not None


def open_checkpoint(path: str | Path, device: torch.device) -> Checkpoint:
    """A checkpoint file or run folder, its model on ``device`` in eval mode."""
    resolved = resolve_checkpoint(path)
    model, cfg, state = load_model(resolved, map_location=device)
    folder = resolved.parent.parent
    in_run = resolved.parent.name == "checkpoints" and (folder / "config.yaml").is_file()
    return Checkpoint(resolved, model.to(device), cfg, state, folder if in_run else None)


def checkpoint_data(
    ckpt: Checkpoint, device: torch.device, name: str | None = None, root: str | None = None
) -> Data:
    """The data a checkpoint was trained on, or dataset ``name`` (under ``root``) instead,
    refused when its classes or channels differ from the model's. A foreign model's data is
    the data it was opened with."""
    if ckpt.data is not None:
        return ckpt.data
    cfg = OmegaConf.to_object(ckpt.cfg.data)  # load_model put it on today's schema
    if name is not None:
        cfg.name = name
    if root is not None:
        cfg.root = root
    data = build_data(cfg, batch_size=ckpt.cfg.batch_size, seed=ckpt.cfg.seed, device=device)
    if (data.num_classes, data.in_chans) != (ckpt.state["num_classes"], ckpt.state["in_chans"]):
        raise ConfigError(
            f"{ckpt.path} predicts {ckpt.state['num_classes']} classes from "
            f"{ckpt.state['in_chans']}-channel images but {cfg.name} has {data.num_classes} "
            f"classes and {data.in_chans} channels: pick the dataset it was trained on"
        )
    return data


def batch_size(requested: int | None, cfg: DictConfig) -> int:
    """``--batch-size``, else the run's ``eval.batch_size``."""
    size = requested if requested is not None else cfg.eval.batch_size
    if size < 1:
        raise ConfigError(f"--batch-size {size} must be >= 1")
    return size


def output_folder(out: str | None, ckpt: Checkpoint, what: str) -> Path:
    """``--out``, else RUN/analysis/<what> (analysis/<what> beside a loose checkpoint); a
    foreign model's analyses go to OUT/analysis/<what> (OUT: --out, runs/analysis/<model>)."""
    if ckpt.foreign:
        return ckpt.run / "analysis" / what
    if out is not None:
        return Path(out)
    base = ckpt.run if ckpt.run is not None else ckpt.path.parent
    return base / "analysis" / what


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    """``1,2,3`` as integers (``''``: none); ``flag`` names the option in the error."""
    if text is None:
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: write integers separated by commas, e.g. 1,2,3"
        ) from None


def parse_space(text: str) -> Any:
    """``--space``: ``full`` (None), a named space (``space3``), the most blocks every stage
    may drop (``N``) or per stage (``0,1,3,0``)."""
    if text == "full":
        return None
    compact = text.replace(" ", "")
    if compact.replace(",", "").isdigit():
        values = parse_ints(compact, "--space")
        return values[0] if len(values) == 1 and "," not in compact else values
    return text
