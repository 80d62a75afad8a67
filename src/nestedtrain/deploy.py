"""Deploy a sub-network: a plain state_dict, TorchScript or ONNX file, with a JSON sidecar.

:func:`deploy_subnet` cuts a sub-network out of the main network (``export_subnet``) with the
BN statistics it was evaluated with (re-estimated for it, as every sub-network evaluation does;
the main network keeps its own), measures the accuracy of exactly that standalone module, and
writes one of :data:`FORMATS` plus ``<file>.json``: what a serving engineer needs (source run,
sub-network, input size and normalisation, classes, accuracy, FLOPs, parameters, and how to
rebuild the module in Python).

- ``state_dict``: loads with ``strict=True`` into the plain model of the sub-network's depths:
  our CIFAR ResNets (resnet56 ``5-5-5`` is a resnet32), timm ResNets (``layers=...``) and timm
  ViTs (``depth=...``); any family also through ``export_subnet`` of a freshly built main
  network. The sidecar's ``rebuild`` holds the exact Python, checked when the file is written.
- ``torchscript``: ``torch.jit.trace``; loads with ``torch.jit.load``, no Python class needed.
- ``onnx``: ``torch.onnx.export`` (the TorchScript-based exporter, which needs no package
  beyond onnx; batch dimension dynamic), then ``onnx.checker`` and a run in onnxruntime on real
  images: the file is written only if the largest absolute logit difference from PyTorch is at
  most :data:`ONNX_TOLERANCE`. Needs the ``deploy`` extra (``pip install 'nestedtrain[deploy]'``).

:func:`measure_latency` times a module on a device: warm-up runs, then the median of timed runs.
"""

from __future__ import annotations

import inspect
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import bn as bn_tools
from .atomic import atomic_save, atomic_write_text
from .elastic.stages import model_family, unwrap
from .elastic.subnet import Subnet, export_subnet
from .errors import ConfigError
from .evaluation import evaluate
from .flops import count_flops, count_params
from .models import CIFAR_DEPTHS

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "deploy_subnet",
    "export_onnx",
    "format_for",
    "measure_latency",
    "plain_constructor",
    "require_onnx",
    "sidecar_path",
]

FORMATS = ("state_dict", "torchscript", "onnx")
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
_ONNX_INPUT, _ONNX_OUTPUT = "images", "logits"
_INSTALL_HINT = "pip install 'nestedtrain[deploy]' (onnx and onnxruntime)"
# ``{split: fn}``, each fn giving that split's (images, labels) batches
_EvalBatches = Mapping[str, Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]]


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """``fmt``, else guessed from the suffix: ``.onnx``, ``.ts``/``.torchscript``, else
    ``state_dict``.

    Raises:
        ConfigError: an unknown format.
    """
    if fmt is None:
        suffix = Path(path).suffix.lower()
        return {".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript"}.get(
            suffix, "state_dict"
        )
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def sidecar_path(path: str | Path) -> Path:
    """Where the JSON sidecar of an exported file goes: ``small.onnx`` -> ``small.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a ConfigError that says what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"ONNX export needs {err.name}: {_INSTALL_HINT}") from None
    return onnx, onnxruntime


# --------------------------------------------------------------------------- rebuilding
def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return "".join(f", {key}={value!r}" for key, value in kwargs.items())


def plain_constructor(
    model: nn.Module,
    model_name: str,
    subnet: Subnet,
    num_classes: int,
    in_chans: int,
    model_kwargs: Mapping[str, Any] | None = None,
) -> str | None:
    """A Python expression that builds the plain model of ``subnet``'s depths, or ``None``.

    Its ``state_dict`` keys and shapes are those of ``export_subnet(model, subnet)``, so the
    exported weights load with ``strict=True``. Known for our CIFAR ResNets
    (``nestedtrain.create_model("resnet32", ...)`` or ``CifarResNet((3, 2, 4), ...)``), timm
    ResNets (``timm.create_model("resnet50", layers=(3, 4, 4, 3))``) and timm ViTs
    (``depth=d``). timm builds MobileNetV3 and EfficientNet from architecture strings that
    ``create_model`` does not take: there, ``None``.
    """
    model = unwrap(model)
    family = model_family(model)
    depths = tuple(len(kept) for kept in subnet.blocks)
    rest = f"num_classes={num_classes}, in_chans={in_chans}" + _kwargs_text(model_kwargs or {})
    if family == "cifar-resnet":
        names = {n: name for name, n in CIFAR_DEPTHS.items()}
        if len(set(depths)) == 1 and depths[0] in names:
            return f"nestedtrain.create_model({names[depths[0]]!r}, {rest})"
        return f"nestedtrain.models.CifarResNet({depths!r}, {rest})"
    if family == "timm-resnet":
        return f"timm.create_model({model_name!r}, {rest}, layers={depths!r})"
    if family == "timm-vit":
        return f"timm.create_model({model_name!r}, {rest}, depth={depths[0]})"
    return None


def _builds(expression: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``expression`` builds a model that ``state`` loads into with ``strict=True``."""
    import timm

    import nestedtrain

    try:
        plain = eval(expression, {"nestedtrain": nestedtrain, "timm": timm})  # our own text
        plain.load_state_dict(state, strict=True)
    except Exception:  # any failure means: do not publish this recipe
        return False
    return True


def _rebuild(
    model: nn.Module,
    model_name: str,
    subnet: Subnet,
    num_classes: int,
    in_chans: int,
    model_kwargs: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    fmt: str,
    file_name: str,
) -> dict[str, Any]:
    if fmt == "torchscript":
        return {"python": f"model = torch.jit.load({file_name!r}).eval()"}
    if fmt == "onnx":
        return {
            "python": f"session = onnxruntime.InferenceSession({file_name!r}); "
            f"logits = session.run(None, {{{_ONNX_INPUT!r}: images}})[0]"
        }
    load = f"model.load_state_dict(torch.load({file_name!r}), strict=True)"
    out: dict[str, Any] = {}
    plain = plain_constructor(model, model_name, subnet, num_classes, in_chans, model_kwargs)
    if plain is not None and _builds(plain, state):
        out["plain_model"] = f"model = {plain}; {load}"
    main = (
        f"nestedtrain.create_model({model_name!r}, num_classes={num_classes}, in_chans={in_chans}"
    )
    main += _kwargs_text(model_kwargs) + ")"
    out["any_family"] = f"model = nestedtrain.export_subnet({main}, {str(subnet)!r}); {load}"
    return out


# ------------------------------------------------------------------------------ writing
@contextmanager
def _quiet_trace() -> Iterator[None]:
    """Silence tracing chatter (TracerWarnings on timm's shape asserts, TorchScript and
    legacy-exporter deprecation notices, constant-folding notes): the checks after writing
    are what tells the user whether the file is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _legacy_exporter() -> dict[str, Any]:
    # torch >= 2.5 has a torch.export-based exporter (the default from 2.9) that needs
    # onnxscript; the TorchScript-based one needs nothing beyond onnx, and is all older
    # versions have (they take no ``dynamo`` argument).
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def _onnx_bytes(module: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """``module`` traced on ``example`` and exported as ONNX (input ``images``, output
    ``logits``, dynamic batch dimension)."""
    buffer = io.BytesIO()
    with _quiet_trace(), torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            **_legacy_exporter(),
            input_names=[_ONNX_INPUT],
            output_names=[_ONNX_OUTPUT],
            dynamic_axes={_ONNX_INPUT: {0: "batch"}, _ONNX_OUTPUT: {0: "batch"}},
            opset_version=opset,
        )
    return buffer.getvalue()


def _onnxruntime_logits(ort: Any, data: bytes, images: torch.Tensor) -> torch.Tensor:
    """The logits of the ONNX model ``data`` on ``images``, run in onnxruntime on the CPU
    with torch's intra-op thread count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([_ONNX_OUTPUT], {_ONNX_INPUT: images.numpy()})[0])


def export_onnx(
    module: nn.Module,
    path: str | Path,
    images: torch.Tensor,
    opset: int = ONNX_OPSET,
    tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Write ``module`` as ONNX after checking it: ``onnx.checker``, then onnxruntime on
    ``images`` against PyTorch.

    The export runs on the CPU in float32 with a dynamic batch dimension (input ``images``,
    output ``logits``); nothing is written when a check fails.

    Returns:
        ``opset``, ``checker``, ``onnxruntime`` (its version), ``parity_images`` and
        ``max_abs_diff`` (largest absolute logit difference from PyTorch).

    Raises:
        ConfigError: onnx/onnxruntime missing, or the model's ONNX logits differ by more than
            ``tolerance``.
    """
    onnx, ort = require_onnx()
    module = module.cpu().float().eval()
    images = images.detach().cpu().float()
    data = _onnx_bytes(module, images[:1], opset)
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    got = _onnxruntime_logits(ort, data, images)
    with torch.no_grad():
        want = module(images)
    diff = float((got - want).abs().max())
    if not diff <= tolerance:
        raise ConfigError(
            f"ONNX parity check failed: max |logits difference| vs PyTorch is {diff:.3g} on "
            f"{len(images)} images, above {tolerance:g}; no file written"
        )
    atomic_save(data, path, saver=lambda blob, f: f.write(blob))
    return {
        "opset": opset,
        "checker": "passed",
        "onnxruntime": ort.__version__,
        "input_name": _ONNX_INPUT,
        "output_name": _ONNX_OUTPUT,
        "dynamic_batch": True,
        "parity_images": len(images),
        "max_abs_diff": diff,
        "tolerance": tolerance,
    }


def _write(module: nn.Module, path: Path, fmt: str, images: torch.Tensor) -> dict[str, Any]:
    if fmt == "state_dict":
        # CPU tensors: the file loads anywhere, with or without a GPU.
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        atomic_save(state, path)
        return {}
    if fmt == "torchscript":
        module = module.cpu().float().eval()
        # TorchScript is deprecated upstream but still loads with torch alone, no class.
        with _quiet_trace(), torch.no_grad():
            scripted = torch.jit.trace(module, images[:1].detach().cpu().float())
            atomic_save(scripted, path, saver=torch.jit.save)
        return {}
    return {"onnx": export_onnx(module, path, images)}


def deploy_subnet(
    model: nn.Module,
    subnet: Subnet | str,
    path: str | Path,
    fmt: str | None = None,
    *,
    input_size: int,
    in_chans: int,
    num_classes: int,
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    calib_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    eval_batches: _EvalBatches | None = None,
    check_images: torch.Tensor | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``subnet`` of ``model`` as ``fmt`` to ``path`` and its JSON sidecar beside it.

    Args:
        model: the main network (its BN statistics are left as they were).
        subnet: the sub-network (a Subnet or its string form).
        path: the file to write; the sidecar goes to :func:`sidecar_path`.
        fmt: one of :data:`FORMATS`; ``None`` guesses from the suffix (:func:`format_for`).
        input_size, in_chans, num_classes: what the model takes and predicts.
        model_name, model_kwargs: how the main network was built (for the rebuild recipe).
        calib_batches: training images to re-estimate the sub-network's BN statistics, as its
            evaluation did; ``None`` keeps the main network's. The full network keeps its own.
        eval_batches: ``{"val": fn, "test": fn}``: the exported module's accuracy on each.
        check_images: normalised images for the ONNX parity check (default: 8 random ones).
        meta: merged into the sidecar first (source run, checkpoint, normalisation, ...).

    Returns:
        The sidecar, as written.
    """
    model = unwrap(model)
    subnet = Subnet.parse(model, subnet) if isinstance(subnet, str) else subnet
    fmt = format_for(path, fmt)
    if fmt == "onnx":
        require_onnx()  # before any work
    path = Path(path)
    is_main = subnet.is_full(model)
    # 1. The standalone module, with the BN statistics its evaluation used.
    standalone = _standalone(model, subnet, None if is_main else calib_batches)
    # 2. What that very module scores and costs.
    measured = _measure(standalone, eval_batches or {}, input_size, in_chans)
    # 3. The file, and the sidecar that says how to use it.
    state = {k: v.detach().cpu() for k, v in standalone.state_dict().items()}
    images = _check_images(check_images, in_chans, input_size, next(model.parameters()).device)
    written = _write(standalone, path, fmt, images)
    rebuild = _rebuild(
        model, model_name, subnet, num_classes, in_chans, model_kwargs or {}, state, fmt, path.name
    )
    recalibrated = not is_main and calib_batches is not None
    what = _what_is_written(path, fmt, model_name, subnet, is_main, recalibrated)
    sidecar = _sidecar(what, num_classes, in_chans, input_size, measured, meta, rebuild, written)
    atomic_write_text(sidecar_path(path), _json(sidecar))
    return sidecar


def _check_images(
    images: torch.Tensor | None, in_chans: int, input_size: int, device: torch.device
) -> torch.Tensor:
    """``images`` for the ONNX parity check on ``device``; when ``None``, 8 random ones from
    a generator seeded with 0."""
    if images is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(8, in_chans, input_size, input_size, generator=generator)
    return images.to(device)


def _sidecar(
    what: Mapping[str, Any],
    num_classes: int,
    in_chans: int,
    input_size: int,
    measured: Mapping[str, Any],
    meta: Mapping[str, Any] | None,
    rebuild: Mapping[str, Any],
    written: Mapping[str, Any],
) -> dict[str, Any]:
    """The sidecar, in order: ``what`` is written, the classes, the input (``meta["input"]``
    merged into it), ``measured``, the rest of ``meta``, ``rebuild``, torch's version, and
    what writing the file reported (``written``: the ONNX checks)."""
    meta = dict(meta or {})
    return {
        **what,
        "num_classes": num_classes,
        "input": {
            "shape": [None, in_chans, input_size, input_size],
            "dtype": "float32",
            "layout": "NCHW",
            **meta.pop("input", {}),
        },
        **measured,
        **meta,
        "rebuild": rebuild,
        "torch": torch.__version__,
        **written,
    }


def _what_is_written(
    path: Path, fmt: str, model_name: str, subnet: Subnet, is_main: bool, recalibrated: bool
) -> dict[str, Any]:
    """The sidecar's first entries: the file, and which network with which BN statistics."""
    return {
        "file": path.name,
        "format": fmt,
        "model": model_name,
        "subnet": str(subnet),
        "depths": [len(kept) for kept in subnet.blocks],
        "is_main_network": is_main,
        "bn": "re-estimated for this sub-network from training images"
        if recalibrated
        else "the main network's own statistics",
    }


def _standalone(
    model: nn.Module,
    subnet: Subnet,
    calib_batches: Callable[[], Iterable[torch.Tensor]] | None,
) -> nn.Module:
    """``export_subnet`` with BN statistics re-estimated from ``calib_batches`` (if given);
    the main network's own statistics are restored afterwards."""
    saved = bn_tools.save_stats(model)
    try:
        if calib_batches is not None:
            bn_tools.recalibrate(model, calib_batches(), subnet)
        return export_subnet(model, subnet).eval()
    finally:
        bn_tools.load_stats(model, saved)


def _measure(
    module: nn.Module,
    eval_batches: _EvalBatches,
    input_size: int,
    in_chans: int,
) -> dict[str, Any]:
    """The sidecar's ``accuracy`` (per split), ``flops``, ``mflops`` and ``params``."""
    accuracy = {
        split: evaluate(module, batches())["acc"] for split, batches in eval_batches.items()
    }
    flops = count_flops(module, input_size, in_chans)
    return {
        "accuracy": accuracy,
        "flops": flops,
        "mflops": flops / 1e6,
        "params": count_params(module),
    }


def _json(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2) + "\n"


# ------------------------------------------------------------------------------ latency
@torch.inference_mode()
def measure_latency(
    module: nn.Module,
    input_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    warmup: int = 10,
    repeats: int = 30,
) -> dict[str, Any]:
    """Wall-clock time of one forward of ``module`` on a batch of ``input_shape``.

    ``warmup`` forwards first (allocator, kernel selection, caches), then ``repeats`` timed
    forwards, each synchronised on CUDA; the median resists the odd slow run on a shared
    machine. ``module`` is moved to ``device`` and put in eval mode.

    Returns:
        ``ms`` (median), ``samples_ms`` (every timed run), ``min_ms``, ``max_ms``,
        ``device``, ``batch``, ``threads`` (torch's intra-op threads), ``warmup``, ``repeats``.

    Raises:
        ConfigError: ``warmup < 0`` or ``repeats < 1``, or an unavailable device.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup={warmup}, repeats={repeats}: need warmup >= 0, repeats >= 1")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"latency device {str(device)!r}: CUDA is not available here; use cpu")
    module = module.to(device).eval()
    images = torch.randn(*input_shape, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        module(images)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(images)
        sync()
        times.append(time.perf_counter() - start)
    return {
        "ms": 1e3 * statistics.median(times),
        "samples_ms": [1e3 * t for t in times],
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "device": str(device),
        "batch": input_shape[0],
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
    }
