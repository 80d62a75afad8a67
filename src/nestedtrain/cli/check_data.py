"""``nestedtrain check-data``: every image of a folder opened and fully decoded, up front."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_command

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check-data``."""
    p = add_command(
        subparsers,
        "check-data",
        cmd_check_data,
        help="find the images of a folder that do not decode",
        description="Open and fully decode every image the run would read, in worker "
        "processes; print the bad ones and their count. Exit status 0 when all decode, 1 when "
        "some do not.",
    )
    p.add_argument(
        "root",
        help="an imagefolder root holding train/ and val/, one tree of class folders, or a "
        "recipe whose data.root is one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_cpus(),
        help="decoding processes (default: the CPUs this process may use, %(default)s)",
    )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _folder(root: str) -> str:
    if Path(root).suffix in (".yaml", ".yml") and Path(root).is_file():
        from ..engine.config import load_config

        data = load_config(root).data
        if data.name != "imagefolder":
            raise ConfigError(
                f"recipe {root!r} reads data.name={data.name!r}: check-data reads imagefolder "
                "recipes or folders"
            )
        return str(data.root)
    return root


def cmd_check_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.images import check_images, find_images

    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give at least 1")
    root = _folder(args.root)
    paths = find_images(root)
    bad: list[tuple[str, str]] = []
    results = check_images(paths, workers=min(args.workers, max(1, len(paths))))
    for path, reason in tqdm(results, total=len(paths), unit="img", file=sys.stderr):
        if reason is not None:
            bad.append((path, reason))
    for path, reason in bad:
        print(f"{path}: {reason}")
    if bad:
        print(f"{len(bad)} of {len(paths)} images do not decode")
        return 1
    print(f"all {len(paths)} images decode")
    return 0
