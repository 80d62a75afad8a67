"""Pick the best sub-network for a budget: FLOPs, parameters, measured latency.

Every sub-network of a model trained with ST is a usable model; :func:`select_subnet` finds
the one to deploy:

1. FLOPs and parameters of every candidate (``nestedtrain.flops``); a budget no sub-network
   meets fails here, before any evaluation, naming the smallest sub-network's cost.
2. Accuracy of every candidate with BN statistics re-estimated for it, through the
   shared-prefix evaluator, on the validation split held out of training (selection) and on
   test (reported beside it, never used to choose). The main network is evaluated with its own
   statistics, as training evaluated it.
3. The Pareto front of selection accuracy against FLOPs (:func:`pareto_front`).
4. Latency, when asked, *measured* (:func:`~nestedtrain.deploy.measure_latency`) for
   every front member within the FLOPs/parameter budget and the main network. Any sub-network
   off the front has a front member at least as accurate with no more FLOPs, so as long as
   latency grows with FLOPs the best one under a latency budget is among those measured.
   Or, from a latency table measured on the serving device
   (:class:`~nestedtrain.analysis.latency.LatencyTable`), for every candidate: measured there,
   or predicted by its additive model when that model's held-out error allows.
5. The pick (:func:`pick_best`): the most accurate candidate inside every budget; ties go to
   fewer FLOPs, then fewer parameters.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..deploy import measure_latency
from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet, export_subnet
from ..errors import ConfigError
from ..evaluation import evaluate, evaluate_subnets
from ..flops import count_flops, count_params
from .latency import LatencyTable

__all__ = ["Budget", "LatencySpec", "pareto_front", "pick_best", "select_subnet"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
# latency_fn(standalone module, its sub-network, spec) -> {"ms": median milliseconds, ...}
LatencyFn = Callable[[nn.Module, Subnet, "LatencySpec"], dict]


@dataclass(frozen=True)
class Budget:
    """Upper bounds a deployed sub-network must meet; ``None`` is no bound."""

    max_mflops: Optional[float] = None  # forward MFLOPs per image
    max_params_m: Optional[float] = None  # millions of parameters
    max_latency_ms: Optional[float] = None  # measured median milliseconds per batch

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"budget {name}={value!r}: give a positive number, or no bound")

    def describe(self) -> str:
        """``<= 4.00 MFLOPs, <= 0.10 M parameters`` or ``none``."""
        parts = []
        if self.max_mflops is not None:
            parts.append(f"<= {self.max_mflops:g} MFLOPs")
        if self.max_params_m is not None:
            parts.append(f"<= {self.max_params_m:g} M parameters")
        if self.max_latency_ms is not None:
            parts.append(f"<= {self.max_latency_ms:g} ms")
        return ", ".join(parts) or "none"

    def fits_cost(self, row: dict[str, Any]) -> bool:
        """Within the FLOPs and parameter bounds."""
        return (self.max_mflops is None or row["flops"] <= self.max_mflops * 1e6) and (
            self.max_params_m is None or row["params"] <= self.max_params_m * 1e6
        )

    def fits(self, row: dict[str, Any]) -> bool:
        """Within every bound; a latency bound needs a measured latency."""
        if not self.fits_cost(row):
            return False
        if self.max_latency_ms is None:
            return True
        return row.get("latency_ms") is not None and row["latency_ms"] <= self.max_latency_ms


@dataclass(frozen=True)
class LatencySpec:
    """How to measure latency: device, batch size, warm-up and timed runs."""

    device: str = "cpu"
    batch: int = 1
    warmup: int = 10
    repeats: int = 30
    # The timed runs of all candidates are interleaved in this many rounds, so that a burst of
    # other work on the machine slows every candidate alike instead of one of them.
    rounds: int = 3

    def __post_init__(self) -> None:
        if self.batch < 1 or self.warmup < 0 or self.repeats < 1 or self.rounds < 1:
            raise ConfigError(
                f"latency batch={self.batch}, warmup={self.warmup}, repeats={self.repeats}, "
                f"rounds={self.rounds}: need batch >= 1, warmup >= 0, repeats >= 1, rounds >= 1"
            )
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(
                f"latency device {self.device!r} is not a device: use cpu, cuda or cuda:N"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"latency device {self.device!r}: CUDA is not available on this machine; use cpu"
            )


def pareto_front(rows: Sequence[dict[str, Any]], cost: str, acc: str) -> list[int]:
    """Indices of the rows no other row dominates (no more ``cost``, at least ``acc``, one of
    them strictly), cheapest first. Of rows equal in both, the first one listed stands for
    them; rows lacking either value are left out."""
    usable = [i for i, r in enumerate(rows) if r.get(cost) is not None and r.get(acc) is not None]
    order = sorted(usable, key=lambda i: (rows[i][cost], -rows[i][acc], i))
    front, best = [], -math.inf
    for i in order:
        if rows[i][acc] > best:
            front.append(i)
            best = rows[i][acc]
    return front


def _cost_text(row: dict[str, Any]) -> str:
    text = f"{row['flops'] / 1e6:.2f} MFLOPs and {row['params'] / 1e6:.3f} M parameters"
    if row.get("latency_ms") is not None:
        text += f", {row['latency_ms']:.3f} ms measured"
    return text


def _nothing_fits(rows: Sequence[dict[str, Any]], budget: Budget) -> ConfigError:
    if budget.max_latency_ms is not None and any(budget.fits_cost(r) for r in rows):
        measured = [r for r in rows if r.get("latency_ms") is not None and budget.fits_cost(r)]
        if not measured:  # a table that neither measured nor predicts these
            return ConfigError(
                f"no sub-network fits the budget ({budget.describe()}): none inside the FLOPs "
                "and parameter bounds has a latency; measure them (a kit with that front) or "
                "allow the predictor (--max-prediction-error)"
            )
        fastest = min(measured, key=lambda r: (r["latency_ms"], r["flops"]))
        how = "predicted" if fastest.get("latency_source") == "predicted" else "measured"
        return ConfigError(
            f"no sub-network fits the budget ({budget.describe()}): the fastest {how}, "
            f"{fastest['subnet']}, takes {fastest['latency_ms']:.3f} ms "
            f"({fastest['flops'] / 1e6:.2f} MFLOPs)"
        )
    smallest = min(rows, key=lambda r: (r["flops"], r["params"]))
    return ConfigError(
        f"no sub-network fits the budget ({budget.describe()}): the smallest, "
        f"{smallest['subnet']}, costs {_cost_text(smallest)}"
    )


def pick_best(rows: Sequence[dict[str, Any]], budget: Budget, acc: str) -> int:
    """Index of the most accurate row inside ``budget``; ties go to fewer FLOPs, then fewer
    parameters, then the first listed.

    Raises:
        ConfigError: nothing fits; the message names the smallest (or fastest measured)
            sub-network's cost.
    """
    fitting = [i for i, r in enumerate(rows) if budget.fits(r) and r.get(acc) is not None]
    if not fitting:
        raise _nothing_fits(rows, budget)
    return max(fitting, key=lambda i: (rows[i][acc], -rows[i]["flops"], -rows[i]["params"], -i))


def _measure_interleaved(
    modules: Sequence[nn.Module], spec: LatencySpec, input_shape: tuple[int, ...]
) -> list[float]:
    """Median latency of each module, timed in ``spec.rounds`` interleaved rounds."""
    samples: list[list[float]] = [[] for _ in modules]
    rounds = min(spec.rounds, spec.repeats)
    for r in range(rounds):
        repeats = spec.repeats // rounds + (1 if r < spec.repeats % rounds else 0)
        for module, times in zip(modules, samples):
            warmup = spec.warmup if r == 0 else min(spec.warmup, 2)
            result = measure_latency(module, input_shape, spec.device, warmup, repeats)
            times += result["samples_ms"]
    return [statistics.median(times) for times in samples]


def select_subnet(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    *,
    val_batches: Batches | None,
    test_batches: Batches,
    calib_batches: Callable[[], Iterable[torch.Tensor]],
    input_size: int,
    in_chans: int,
    budget: Budget | None = None,
    select_on: str = "val",
    latency: LatencySpec | None = None,
    latency_fn: LatencyFn | None = None,
    chunk_images: int | None = None,
    latency_table: LatencyTable | None = None,
) -> dict[str, Any]:
    """Evaluate ``subnets`` (and the main network) and pick the best one inside ``budget``.

    Args:
        model: the main network.
        subnets: candidate sub-networks; the main network is always one of them.
        val_batches: the validation split held out of training (``None``: the run has none).
        test_batches: the test split, reported beside the selection accuracy.
        calib_batches: training images to re-estimate BN statistics per sub-network.
        input_size, in_chans: the input the model takes (FLOPs, latency).
        budget: the bounds (``None``: none); a latency bound needs ``latency`` or a table.
        select_on: ``"val"`` (default), or ``"test"`` to select on test explicitly.
        latency: measure latency this way for the front within the FLOPs/parameter budget and
            for the main network; ``None`` measures nothing.
        latency_fn: ``(module, subnet, spec) -> {"ms": ...}``; default: ``measure_latency``
            on standalone exports, interleaved in ``spec.rounds`` rounds, the median.
        chunk_images: see :func:`~nestedtrain.evaluation.subnet_logits`.
        latency_table: take every candidate's latency from this table (measured on the
            serving device, or predicted) instead of measuring here; excludes ``latency``.

    Returns:
        The rows of every candidate, the main network's and the pick's, the fronts and the
        settings (:func:`_result` lists the keys).

    Raises:
        ConfigError: a bad split choice, a latency bound with no way to measure it, or a budget
            nothing meets (one line naming the smallest sub-network's cost).
    """
    model, budget = unwrap(model), budget or Budget()
    _check_request(budget, select_on, val_batches, latency, latency_table)
    acc_key = f"{select_on}_acc"
    candidates, main_index = _candidates(model, subnets)
    # 1. Costs: a budget nothing meets fails here, before any evaluation; 2. accuracy; 3. fronts.
    rows = _cost_rows(model, candidates, main_index, budget, input_size, in_chans)
    time_rows = _row_timer(model, candidates, rows, latency, latency_fn, in_chans, input_size)
    for row, subnet in zip(rows, candidates) if latency_table is not None else ():
        row["latency_ms"], row["latency_source"] = latency_table.latency(subnet)
    _stop_if_cheapest_is_too_slow(rows, budget, time_rows)
    # the main network with its own BN statistics, the others re-estimated
    splits = {"test": test_batches, **({"val": val_batches} if val_batches is not None else {})}
    _evaluate_splits(model, rows, candidates, main_index, splits, calib_batches, chunk_images)
    front, latency_front = _fronts(rows, budget, acc_key, main_index, time_rows)
    pick = pick_best(rows, budget, acc_key)
    spec = latency_table.summary() if latency_table is not None else latency
    return _result(rows, main_index, pick, front, latency_front, select_on, budget, spec)


def _candidates(model: nn.Module, subnets: Sequence[Subnet | str]) -> tuple[list[Subnet], int]:
    """The distinct ``subnets`` (strings parsed) with the main network added when missing,
    and the main network's index among them."""
    full = Subnet.full(model)
    parsed = [Subnet.parse(model, s) if isinstance(s, str) else s for s in subnets]
    candidates = list(dict.fromkeys([*parsed, full]))
    return candidates, candidates.index(full)


def _result(
    rows: list[dict[str, Any]],
    main_index: int,
    pick: int,
    front: Sequence[int],
    latency_front: Sequence[int],
    select_on: str,
    budget: Budget,
    latency: LatencySpec | dict[str, Any] | None,
) -> dict[str, Any]:
    """What :func:`select_subnet` returns: the settings, then the rows picked out, then all.

    ``subnets`` (one row per sub-network: ``subnet``, ``depths``, ``blocks``, ``is_main``,
    ``bn``, ``val_acc``, ``test_acc``, ``flops``, ``params``, ``latency_ms`` (or ``None``),
    ``latency_source`` (``measured``, here or in the table, ``predicted`` or ``None``),
    ``on_front``, ``on_latency_front``, ``fits_budget``), ``main`` and ``pick`` (rows),
    ``front`` and ``latency_front`` (sub-network strings, cheapest first), ``selection_split``,
    ``budget`` and ``latency`` (the settings, threads included; for a table, its machine, the
    predictor and its held-out error).
    """
    if isinstance(latency, LatencySpec):
        latency = {**asdict(latency), "source": "measured", "threads": torch.get_num_threads()}
    return {
        "selection_split": select_on,
        "bn": "re-estimated per sub-network from training images; the main network keeps its own",
        "budget": asdict(budget),
        "latency": latency,
        "main": rows[main_index],
        "pick": rows[pick],
        "front": [rows[i]["subnet"] for i in front],
        "latency_front": [rows[i]["subnet"] for i in latency_front],
        "subnets": rows,
    }


def _check_request(
    budget: Budget,
    select_on: str,
    val_batches: Batches | None,
    latency: LatencySpec | None,
    table: LatencyTable | None,
) -> None:
    if select_on not in ("val", "test"):
        raise ConfigError(f"select_on={select_on!r}: use 'val' (default) or 'test'")
    if select_on == "val" and val_batches is None:
        raise ConfigError(
            "no validation split to select on: selecting on test would make its accuracy an "
            "optimistic estimate; pass select_on='test' to do it anyway"
        )
    if latency is not None and table is not None:
        raise ConfigError("latency from a table or measured here: pass latency or latency_table")
    if budget.max_latency_ms is not None and latency is None and table is None:
        raise ConfigError(
            "a latency budget needs latencies: pass latency=LatencySpec() or latency_table"
        )


def _cost_row(
    model: nn.Module, subnet: Subnet, is_main: bool, input_size: int, in_chans: int
) -> dict[str, Any]:
    """A candidate's row with its costs; accuracies and latency are filled in later."""
    return {
        "subnet": str(subnet),
        "depths": [len(kept) for kept in subnet.blocks],
        "blocks": subnet.num_blocks,
        "is_main": is_main,
        "bn": "own" if is_main else "re-estimated",
        "val_acc": None,
        "test_acc": None,
        "flops": count_flops(model, input_size, in_chans, subnet=subnet),
        "params": count_params(model, subnet=subnet),
        "latency_ms": None,
        "latency_source": None,
    }


def _cost_rows(
    model: nn.Module,
    candidates: Sequence[Subnet],
    main_index: int,
    budget: Budget,
    input_size: int,
    in_chans: int,
) -> list[dict[str, Any]]:
    """Every candidate's row with its costs.

    Raises:
        ConfigError: no candidate meets the FLOPs and parameter bounds of ``budget``.
    """
    rows = [
        _cost_row(model, subnet, i == main_index, input_size, in_chans)
        for i, subnet in enumerate(candidates)
    ]
    if not any(budget.fits_cost(r) for r in rows):
        raise _nothing_fits(rows, budget)
    return rows


def _row_timer(
    model: nn.Module,
    candidates: Sequence[Subnet],
    rows: list[dict[str, Any]],
    latency: LatencySpec | None,
    latency_fn: LatencyFn | None,
    in_chans: int,
    input_size: int,
) -> Callable[[Sequence[int]], None] | None:
    """A function that measures the latency of the rows it is given, side by side; ``None``
    when neither ``latency`` nor ``latency_fn`` asks for latency."""
    if latency is None and latency_fn is None:
        return None
    shape = (latency.batch if latency else 1, in_chans, input_size, input_size)

    def time_rows(indices: Sequence[int]) -> None:
        modules = [export_subnet(model, candidates[i]) for i in indices]
        if latency_fn is not None:
            times = [
                float(latency_fn(m, candidates[i], latency)["ms"]) for i, m in zip(indices, modules)
            ]
        else:
            times = _measure_interleaved(modules, latency, shape)
        for i, ms in zip(indices, times):
            rows[i]["latency_ms"], rows[i]["latency_source"] = ms, "measured"

    return time_rows


def _stop_if_cheapest_is_too_slow(
    rows: list[dict[str, Any]], budget: Budget, time_rows: Callable[[Sequence[int]], None] | None
) -> None:
    """Before the costly evaluation: if the cheapest sub-network is too slow for the latency
    bound of ``budget`` (if any; ``time_rows`` measures it), stop here. Without ``time_rows``
    the rows hold a table's latencies already: stop if none of them fits."""
    if budget.max_latency_ms is None:
        return
    if time_rows is None:
        if not any(budget.fits(r) for r in rows):
            raise _nothing_fits(rows, budget)
        return
    cheapest = min(
        (i for i, r in enumerate(rows) if budget.fits_cost(r)),
        key=lambda i: (rows[i]["flops"], rows[i]["params"]),
    )
    time_rows([cheapest])
    if rows[cheapest]["latency_ms"] > budget.max_latency_ms:
        raise _nothing_fits([rows[cheapest]], budget)


def _evaluate_splits(
    model: nn.Module,
    rows: list[dict[str, Any]],
    candidates: Sequence[Subnet],
    main_index: int,
    splits: dict[str, Batches],
    calib_batches: Callable[[], Iterable[torch.Tensor]],
    chunk_images: int | None,
) -> None:
    """Fill every row's ``<split>_acc`` for each of ``splits``, in their order."""
    for split, batches in splits.items():
        _evaluate_split(
            model, rows, candidates, main_index, split, batches, calib_batches, chunk_images
        )


def _evaluate_split(
    model: nn.Module,
    rows: list[dict[str, Any]],
    candidates: Sequence[Subnet],
    main_index: int,
    split: str,
    batches: Batches,
    calib_batches: Callable[[], Iterable[torch.Tensor]],
    chunk_images: int | None,
) -> None:
    """Fill every row's ``<split>_acc``."""
    rows[main_index][f"{split}_acc"] = evaluate(model, batches())["acc"]
    others = [s for i, s in enumerate(candidates) if i != main_index]
    if not others:
        return
    results = evaluate_subnets(
        model,
        others,
        eval_batches=batches,
        calib_batches=calib_batches,
        chunk_images=chunk_images,
    )
    by_subnet = {r["subnet"]: r["acc"] for r in results}
    for row in rows:
        if not row["is_main"]:
            row[f"{split}_acc"] = by_subnet[row["subnet"]]


def _fronts(
    rows: list[dict[str, Any]],
    budget: Budget,
    acc_key: str,
    main_index: int,
    time_rows: Callable[[Sequence[int]], None] | None,
) -> tuple[list[int], list[int]]:
    """The FLOPs front and, when timing, the latency front; marks each row's place on them."""
    front = pareto_front(rows, "flops", acc_key)
    if time_rows is not None:
        # All of them again, the cheapest too: measured side by side, in the same rounds.
        inside = [i for i, r in enumerate(rows) if budget.fits_cost(r)]
        inside_front = pareto_front([rows[i] for i in inside], "flops", acc_key)
        time_rows(sorted({inside[j] for j in inside_front} | {main_index}))
    latency_front = pareto_front(rows, "latency_ms", acc_key)
    for i, row in enumerate(rows):
        row["on_front"] = i in front
        row["on_latency_front"] = i in latency_front
        row["fits_budget"] = budget.fits(row)
    return front, latency_front
