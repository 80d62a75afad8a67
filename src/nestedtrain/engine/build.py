"""Recipe to objects, in one place: the model, its loss, optimizer and schedule, and the method.

Everything a recipe names is built here and nowhere else; the trainer only runs what it gets.
:func:`build_method` builds each method of :data:`~nestedtrain.engine.config.METHODS`, the one
list of methods (recipe validation reads it).
A method's step object (``nestedtrain.methods``) needs none of this: build it from plain
objects to use it in your own loop.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..data import Data
from ..distributed import DistInfo, all_ranks, input_memory_format, wrap_ddp
from ..elastic.sampling import build_sampler
from ..elastic.stages import find_stages
from ..elastic.weightmap import WeightMap
from ..errors import ConfigError
from ..methods import (
    CommonTraining,
    MethodStep,
    MotivationTraining,
    Precision,
    SandwichTraining,
    StimulativeTraining,
)
from ..methods.conditions import Condition, build_condition
from ..methods.shared_prefix import decide_shared_prefix
from ..methods.stimulative import shared_prefix_veto
from ..models import create_model
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from .config import TrainConfig, check_method, plain

__all__ = [
    "MethodParts",
    "build_criterion",
    "build_method",
    "build_model",
    "build_motivated_model",
    "build_optimizer",
    "build_run_model",
    "build_scheduler",
    "load_model",
]

# ---------------------------------------------------------------------------------- model


def build_model(cfg: DictConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The model a recipe describes, without weights from anywhere."""
    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    if cfg.model.drop_rate:
        kwargs["drop_rate"] = cfg.model.drop_rate
    if cfg.model.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    return create_model(
        cfg.model.name,
        num_classes=num_classes,
        in_chans=in_chans,
        pretrained=cfg.model.pretrained,
        **kwargs,
    )


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", key: str = "model"
) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """Rebuild a checkpoint's model with its weights (never fetching pretrained ones).

    Returns:
        ``(model, config, checkpoint)``; the model is in eval mode.
    """
    state = load_checkpoint(path, map_location)
    # On today's schema: a field added since the run was trained takes its default.
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"])
    fresh = OmegaConf.merge(cfg, {"model": {"pretrained": False}})
    model = build_model(fresh, state["num_classes"], state["in_chans"])
    model.load_state_dict(state[key])
    return model.eval(), cfg, state


def build_run_model(
    cfg: DictConfig, num_classes: int, in_chans: int, device: torch.device
) -> nn.Module:
    """The model a run trains: :func:`build_model` with its pretrained or ``model.init_from``
    weights, on ``device``.

    Raises:
        ConfigError: pretrained weights that cannot be fetched, or an ``init_from`` file that
            is missing or does not fit.
    """
    try:
        model = build_model(cfg, num_classes, in_chans)
    except ValueError:
        raise
    except Exception as err:  # timm raises many kinds for a failed pretrained fetch
        if cfg.model.pretrained:
            raise ConfigError(
                f"could not load pretrained weights for {cfg.model.name!r} "
                f"({type(err).__name__}): this machine may not reach the weights hub; "
                "use model.init_from=PATH instead"
            ) from None
        raise
    if cfg.model.init_from:
        _load_init_weights(model, cfg.model.init_from)
    return _to_device(model, cfg, device)


def build_motivated_model(cfg: DictConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The recipe's motivated model: ``motivation.model`` with the base model's settings,
    ``motivation.kwargs`` over ``model.kwargs`` and its own dropout rates where given."""
    m = cfg.motivation
    if not m.model:
        raise ConfigError(
            "method=motivation needs motivation.model, the larger model of the base model's "
            f"family (e.g. resnet32 for model.name={cfg.model.name})"
        )
    model_cfg = OmegaConf.merge(
        cfg.model,
        {
            "name": m.model,
            "init_from": None,
            "kwargs": m.kwargs,
            "drop_rate": cfg.model.drop_rate if m.drop_rate is None else m.drop_rate,
            "drop_path_rate": (
                cfg.model.drop_path_rate if m.drop_path_rate is None else m.drop_path_rate
            ),
        },
    )
    return build_model(OmegaConf.create({"model": model_cfg}), num_classes, in_chans)


def _to_device(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    model.to(device)
    if input_memory_format(device, cfg.channels_last) == torch.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _load_init_weights(model: nn.Module, path: str) -> None:
    """Weights from a nestedtrain checkpoint or a plain state_dict; a new classifier when the
    number of classes differs (fine-tuning)."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(
            f"model.init_from={path!r} does not exist: give a checkpoint or weights file"
        )
    try:
        # A plain state_dict loads without unpickling arbitrary objects; a nestedtrain
        # checkpoint holds RNG states too, and goes through load_checkpoint.
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        state = load_checkpoint(source)
    except Exception as err:
        raise ConfigError(
            f"model.init_from={path!r} is not readable by torch.load ({type(err).__name__})"
        ) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"model.init_from={path!r} holds neither a nestedtrain checkpoint nor a state_dict"
        )
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    classifier = _classifier_prefix(model)
    if any(not k.startswith(classifier) for k in mismatched):
        bad = next(k for k in mismatched if not k.startswith(classifier))
        raise ConfigError(
            f"model.init_from={path!r} does not fit {model.__class__.__name__}: {bad} has shape "
            f"{tuple(state[bad].shape)}, the model needs {tuple(own[bad].shape)}"
        )
    kept = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from={path!r} does not fit {model.__class__.__name__}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(first: {(missing + unexpected)[0]})"
        )


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "fc")
    return (name[0] if isinstance(name, (list, tuple)) else name) + "."


# --------------------------------------------------------------- loss, optimizer, schedule


def build_criterion(
    cfg: DictConfig,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The supervised loss a recipe asks for: timm's BCE for ``loss: bce``, else None (the
    method's default, CE with ``data.label_smoothing``)."""
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=cfg.data.label_smoothing)
    return None


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer for ``model`` as the recipe's ``optim`` section says (timm's factory)."""
    optim = cfg.optim
    return create_optimizer_v2(
        model,
        opt=optim.name,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        momentum=optim.momentum,
        **({"eps": optim.eps} if optim.eps is not None else {}),
    )


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The recipe's learning-rate schedule (timm's, stepped per update) at step 0, or None
    for ``sched.name: none``."""
    if cfg.sched.name == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched.name,
        num_epochs=cfg.epochs,
        decay_epochs=cfg.sched.decay_epochs,
        decay_rate=cfg.sched.decay_rate,
        min_lr=cfg.sched.min_lr,
        warmup_lr=cfg.sched.warmup_lr,
        warmup_epochs=cfg.sched.warmup_epochs,
        cooldown_epochs=0,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    scheduler.step(0)
    return scheduler


# -------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodParts:
    """What a method's step object is built from, once the run has set it up.

    Attributes:
        cfg: the recipe.
        model: the model being trained (each method wraps it in DDP under torchrun).
        optimizer: the model's optimizer.
        precision: the autocast/GradScaler policy.
        generator: the run's seeded generator (sub-network sampling).
        data: the run's data (sizes, held-out batches).
        device: where the model lives.
        dist: the process group's facts.
    """

    cfg: DictConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    generator: torch.Generator
    data: Data
    device: torch.device
    dist: DistInfo


def _build_ct(parts: MethodParts) -> MethodStep:
    cfg = parts.cfg
    return CommonTraining(
        wrap_ddp(parts.model, parts.dist, parts.device),
        parts.optimizer,
        parts.precision,
        cfg.data.label_smoothing,
        criterion=build_criterion(cfg),
    )


# The ``st`` fields that build the sub-network sampler; every other ``st`` field is the
# StimulativeTraining keyword argument of the same name.
_SAMPLER_FIELDS = ("sampler", "space", "p")


def _build_st(parts: MethodParts) -> MethodStep:
    cfg = parts.cfg
    options = plain(cfg.st)
    kind, space, p = (options.pop(name) for name in _SAMPLER_FIELDS)
    # the shared prefix is decided on two test images, here and (alike) in the step object,
    # in the training batches' memory format (the shared-prefix head forwards reuse them)
    example = next(iter(parts.data.eval_batches("test", batch_size=2)))[0]
    example = example.contiguous(memory_format=input_memory_format(parts.device, cfg.channels_last))
    # Under DDP, decided before wrapping: DDP must look for parameters without gradients (a
    # sub-network's skipped blocks) only where a synchronised backward runs a sub-network, the
    # plain runner's last one. The shared-prefix runner backpropagates under no_sync and
    # all-reduces by hand, and a step without sub-networks runs the whole main network:
    # neither pays for the search. (One process has no DDP, and no second probe.) Sandwich
    # always trains its smallest sub-network.
    sandwich = cfg.method == "sandwich"
    draws = options["lam"] > 0 and (options["num_subnets"] > 0 or sandwich)
    samples = parts.dist.enabled and draws
    shared = samples and _shares_prefix(parts, options, example)
    wrapped = wrap_ddp(parts.model, parts.dist, parts.device, samples and not shared)
    step = (SandwichTraining if sandwich else StimulativeTraining)(
        wrapped,
        parts.optimizer,
        sampler=build_sampler(parts.model, kind=kind, space=space, p=p),
        generator=parts.generator,
        precision=parts.precision,
        label_smoothing=cfg.data.label_smoothing,
        criterion=build_criterion(cfg),
        example_inputs=example,
        **options,
    )
    decided = step.shared_prefix  # None: decided on the first step (sandwich without random)
    if samples and decided is not None and decided.startswith("on") != shared:
        raise RuntimeError(f"ST's shared prefix was decided twice differently: {decided}")
    return step


def _shares_prefix(parts: MethodParts, options: dict[str, Any], example: torch.Tensor) -> bool:
    """Whether the ST step will compute shared prefixes once, decided as the step decides
    it (on every rank: all of them do, or none)."""
    why_not = shared_prefix_veto(options.get("share_prefix", True), options.get("bn", "protect"))
    split, _ = decide_shared_prefix(parts.model, find_stages(parts.model), example, why_not)
    return all_ranks(split is not None, device=parts.device)


def _build_motivation(parts: MethodParts) -> MethodStep:
    """The trainer's model is the base model; ``motivation`` names the motivated one."""
    cfg, data = parts.cfg, parts.data
    motivated = build_motivated_model(cfg, data.num_classes, data.in_chans)
    motivated = _to_device(motivated, cfg, parts.device)
    # Pair the models before anything else: a base that is not smaller fails here.
    weight_map = WeightMap(parts.model, motivated, qkv=cfg.motivation.qkv)
    optimizer = build_optimizer(cfg, motivated)
    for group, lead in zip(optimizer.param_groups, parts.optimizer.param_groups):
        group["lr"] = lead["lr"]  # start on the schedule, as the loop keeps it afterwards
    condition = _build_condition(cfg, data.steps_per_epoch)
    val_batch = None
    if "val_loss" in condition.needs:
        images, labels = _held_out_batch(data)
        # in the training batches' memory format, as every input the models see
        fmt = input_memory_format(parts.device, cfg.channels_last)
        val_batch = images.contiguous(memory_format=fmt), labels
    return MotivationTraining(
        wrap_ddp(parts.model, parts.dist, parts.device),
        wrap_ddp(motivated, parts.dist, parts.device),
        parts.optimizer,
        optimizer,
        condition,
        val_batch=val_batch,
        weight_map=weight_map,
        precision=parts.precision,
        label_smoothing=cfg.data.label_smoothing,
        criterion=build_criterion(cfg),
        reestimate_bn=cfg.motivation.reestimate_bn,
    )


def _build_condition(cfg: DictConfig, steps_per_epoch: int) -> Condition:
    """The recipe's motivation condition."""
    m = cfg.motivation
    options: dict[str, Any] = {}
    if m.condition == "ema":
        options = {"alpha": m.ema_alpha, "threshold": m.ema_threshold}
    elif m.condition == "random_a" and m.max_activations is not None:
        options = {"max_activations": m.max_activations}
    elif m.condition == "random_b":
        options = {"counts_from": list(m.counts_from)}
    # The random conditions get their own generator, seeded alike on every rank.
    generator = torch.Generator().manual_seed(cfg.seed)
    return build_condition(m.condition, m.k, steps_per_epoch, generator, **options)


def _held_out_batch(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the validation split (training images no step sees), unaugmented."""
    if data.n_val == 0:
        raise ConfigError(
            "motivation.condition=val_loss holds out a batch of the validation split, but "
            "data.val_size=0: set data.val_size > 0 (e.g. 0.01)"
        )
    batch = next(iter(data.eval_batches("val", batch_size=data.local_batch_size)), None)
    if batch is None:
        raise ConfigError(
            f"the validation split's {data.n_val} images leave this rank none to hold out for "
            f"motivation.condition=val_loss: hold out at least world_size={data.world_size}"
        )
    return batch


def build_method(parts: MethodParts) -> MethodStep:
    """The step object of ``parts.cfg.method``, its model DDP-wrapped under torchrun.

    Raises:
        ConfigError: not a method of :data:`~nestedtrain.engine.config.METHODS`.
    """
    method = parts.cfg.method
    check_method(method)
    if method == "ct":
        return _build_ct(parts)
    if method == "motivation":
        return _build_motivation(parts)
    return _build_st(parts)  # st, stpp and sandwich: built alike, told apart by their options
