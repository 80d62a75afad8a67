"""The training recipe: an OmegaConf structured config, read from YAML plus dotted overrides.

Resolution order: schema defaults < the method's preset (``st``, ``stpp``, ``sandwich``) < the
recipe file <
``key=value`` overrides. An unknown key or a value of the wrong type is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.config import DataConfig
from ..errors import ConfigError

__all__ = [
    "METHODS",
    "TrainConfig",
    "check_method",
    "describe_fields",
    "load_config",
    "to_yaml",
]


@dataclass
class ModelConfig:
    name: str = "resnet20"  # ours (resnet20/32/44/56/110) or any timm model name
    pretrained: bool = False  # start from timm's pretrained weights (needs a download)
    init_from: Optional[str] = None  # start from a checkpoint or state_dict file
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth (timm models)
    kwargs: dict = field(default_factory=dict)  # more create_model arguments, e.g. img_size


@dataclass
class OptimConfig:
    name: str = "sgd"  # timm optimizer: sgd (Nesterov), momentum, adamw, rmsproptf, lamb, ...
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: Optional[float] = None  # optimizer epsilon; None = timm's default
    clip_grad: Optional[float] = None  # clip the global gradient norm


@dataclass
class SchedConfig:
    name: str = "cosine"  # timm scheduler: cosine | step | multistep | plateau | none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: float = 30.0  # step: decay every this many epochs
    decay_rate: float = 0.1  # step: multiply lr by this


@dataclass
class STConfig:
    lam: float = 1.0  # λ, weight of each sub-network's KL term
    num_subnets: int = 1  # sub-networks per step
    sampler: str = "ordered"  # ordered | stochastic
    space: Optional[Any] = None  # ordered: null (full) | space3 | per-stage max drops [0,1,3,0]
    p: float = 0.5  # stochastic: keep probability of a skippable block
    kl_norm: str = "none"  # none (KL) | std (KL⁻, reference code) | l2 (KL⁻, paper formula)
    temperature: float = 1.0
    amplitude: float = 1.0
    norm_main_ce: bool = False  # main CE on the normalised logits (reference code with KL⁻)
    resize: Optional[list] = None  # [lo, hi] fractions of the training crop for sub-networks
    resize_per: str = "subnet"  # subnet (a side per sub-network, reference) | step (one side)
    resize_multiple: int = 1  # resize sides are multiples of this (8 suits cuDNN/tensor cores)
    share_prefix: bool = True  # compute what sub-networks share with the main network once
    target: str = "teacher"  # teacher | label (fine-tuning)
    start_epoch: int = 0  # first epoch that samples sub-networks
    bn: str = "protect"  # protect | reference


@dataclass
class MotivationConfig:
    model: Optional[str] = None  # the motivated (larger) model; required for method=motivation
    kwargs: dict = field(default_factory=dict)  # its create_model arguments over model.kwargs
    drop_rate: Optional[float] = None  # its dropout; None = model.drop_rate
    drop_path_rate: Optional[float] = None  # its stochastic depth; None = model.drop_path_rate
    condition: str = "loss_decrease"  # | ema | val_loss | grad_slope | random_a | random_b
    k: int = 2  # steps in a row (the one k the paper states, EfficientNet; tune with tune-k)
    ema_alpha: float = 0.02  # ema: smoothing factor
    ema_threshold: float = 0.002  # ema: a relative drop larger than this is a decrease
    max_activations: Optional[int] = None  # random_a: most motivated steps per epoch
    counts_from: list = field(default_factory=list)  # random_b: metrics.jsonl of earlier runs
    qkv: str = "split"  # ViT fused qkv mapping: split | literal
    # evaluate and save the motivated model with BN statistics re-estimated from training
    # images (its buffers are the base model's); motivated_acc_raw logs it without
    reestimate_bn: bool = True


@dataclass
class EvalConfig:
    subnets: str = (
        "sample:8"  # sub-networks evaluated each epoch: none | all | sample:N | 3-2-4,...
    )
    every: int = 1  # evaluate every E epochs (and after the last)
    batch_size: int = 512
    # MiB of activations that sub-network evaluation caches at once (shared prefixes): the
    # evaluation and calibration images are run in chunks sized to fit, so memory does not
    # grow with the dataset; results are identical for every value
    memory_mb: float = 1024.0  # sub-network evaluation's activation cache (CUDA: <= free/2)


@dataclass
class CheckpointConfig:
    # checkpoints/last.pt is written after every epoch, and within an epoch whenever either
    # of these is due (it then holds the exact position in the epoch: a resumed run goes on
    # as if it had never stopped)
    every_steps: int = 0  # every N training steps; 0 = off
    every_minutes: float = 30.0  # when this much wall time passed since the last one; 0 = off


@dataclass
class AnalysisConfig:
    kl_drift_every: int = 0  # record KL(main ‖ sub) over the space every E epochs; 0 = off
    kl_drift_subnets: str = "sample:16"  # all | sample:N


@dataclass
class TrainConfig:
    method: str = "ct"  # ct | st | stpp | sandwich | motivation
    epochs: int = 10
    batch_size: int = 128  # global batch, split across distributed ranks
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    amp_dtype: str = "bfloat16"  # bfloat16 | float16
    channels_last: bool = True  # channels-last memory format on CUDA (ignored on the CPU)
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3)
    ema_decay: float = 0.9998
    loss: str = "ce"  # ce | bce (timm's A3 recipe trains with binary cross-entropy)
    log_every: int = 50  # read the loss terms on the host every N steps (progress, NaN check)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    st: STConfig = field(default_factory=STConfig)
    motivation: MotivationConfig = field(default_factory=MotivationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# The training methods, the one list of them (recipe validation reads it, engine/build.py
# builds each), with the preset applied under the recipe when ``method`` names it (see
# DESIGN.md).
METHODS: dict[str, dict[str, Any]] = {
    "ct": {},
    "st": {"st": {"lam": 1.0, "kl_norm": "none", "num_subnets": 1, "space": None}},
    "stpp": {
        "st": {
            "lam": 1.0,
            "kl_norm": "std",
            "temperature": 1.0,
            "amplitude": 1.0,
            "norm_main_ce": True,
            "num_subnets": 6,
            "resize": [0.43, 1.0],
        }
    },
    # the sandwich rule as slimmable/US-Nets and BigNAS use it: the smallest and 2 random
    # sub-networks a step, plain KL to the main network's output, weight 1 each
    "sandwich": {"st": {"lam": 1.0, "kl_norm": "none", "num_subnets": 2, "space": None}},
    "motivation": {},
}

# ST++ bounds the sampling space of the deep ImageNet ResNets with "space3".
_STPP_SPACE3_MODELS = ("resnet50", "resnet101", "resnet152")


def _schema() -> DictConfig:
    return OmegaConf.structured(TrainConfig)


def _read_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist: give the path of a YAML recipe")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's errors are many classes; all mean the same to a user
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of fields, got a list")
    return loaded


def _dotlist(overrides: list[str]) -> DictConfig:
    schema = OmegaConf.structured(TrainConfig)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must be key=value, e.g. epochs=3")
        _check_not_a_group(item, schema)
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _check_not_a_group(item: str, schema: DictConfig) -> None:
    """Refuse ``model=NAME`` and the like, a common slip for ``model.name=NAME``: OmegaConf
    refuses it too, with a merge message that does not say what to write."""
    key, _, value = item.partition("=")
    if key not in schema or not OmegaConf.is_dict(schema[key]):
        return
    group = schema[key]
    if "name" in group:
        hint = f"did you mean {key}.name={value}?"
    else:
        hint = "set one of its fields: " + ", ".join(f"{key}.{f}=..." for f in group)
    raise ConfigError(f"override {item}: {key!r} is a group of settings; {hint}")


def _merge(*configs: Any) -> DictConfig:
    try:
        return OmegaConf.merge(*configs)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not in" in message:
        return (
            f"unknown recipe field {key!r}: see `nestedtrain train --help` for the fields"
            if key
            else message
        )
    if key:
        return f"bad value for {key}: {message}"
    return message


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Resolve a recipe: schema defaults < preset < recipe file < dotted overrides.

    Raises:
        ConfigError: unreadable recipe, unknown field, wrong type, bad value.
    """
    layers = [_read_yaml(recipe)] if recipe is not None else []
    layers.append(_dotlist(overrides or []))
    user = _merge(_schema(), *layers)  # validates field names and types first
    method = user.method
    check_method(method)  # before its preset is looked up
    preset = dict(METHODS[method])
    if method == "stpp" and user.model.name in _STPP_SPACE3_MODELS:
        preset = {"st": {**preset["st"], "space": "space3"}}
    cfg = _merge(_schema(), preset, *layers)
    validate(cfg)
    return cfg


def check_method(name: str) -> None:
    """``name`` is one of :data:`METHODS`.

    Raises:
        ConfigError: it is not.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone do not catch."""
    checks = [
        (cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0"),
        (cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0"),
        (cfg.loss in ("ce", "bce"), f"loss={cfg.loss!r} must be 'ce' or 'bce'"),
        (cfg.eval.every >= 1, f"eval.every={cfg.eval.every} must be >= 1"),
        (cfg.eval.memory_mb > 0, f"eval.memory_mb={cfg.eval.memory_mb} must be > 0 (MiB)"),
        (cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1"),
        (
            cfg.checkpoint.every_steps >= 0,
            f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be >= 0 (0 = off)",
        ),
        (
            cfg.checkpoint.every_minutes >= 0,
            f"checkpoint.every_minutes={cfg.checkpoint.every_minutes} must be >= 0 (0 = off)",
        ),
        (
            cfg.sched.warmup_epochs >= 0,
            f"sched.warmup_epochs={cfg.sched.warmup_epochs} must be >= 0",
        ),
        (
            cfg.analysis.kl_drift_every >= 0,
            f"analysis.kl_drift_every={cfg.analysis.kl_drift_every} must be >= 0",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from ..methods.stimulative import check_options

    check_options(**plain(cfg.st))  # the st options' ranges, where the method defines them
    if cfg.method == "motivation":
        _validate_motivation(cfg)
        if cfg.ema:
            # the EMA would follow the base model's weights only, stale during motivated steps
            raise ConfigError("ema=true is not supported with method=motivation: set ema=false")


def _validate_motivation(cfg: DictConfig) -> None:
    from ..methods.conditions import CONDITIONS

    m = cfg.motivation
    checks = [
        (
            bool(m.model),
            "method=motivation needs motivation.model, the larger model of the base model's "
            f"family (e.g. resnet32 for model.name={cfg.model.name})",
        ),
        (
            m.condition in CONDITIONS,
            f"motivation.condition={m.condition!r} must be one of {', '.join(CONDITIONS)}",
        ),
        (m.k >= 1, f"motivation.k={m.k} must be >= 1"),
        (0 < m.ema_alpha <= 1, f"motivation.ema_alpha={m.ema_alpha} must be in (0, 1]"),
        (
            0 <= m.ema_threshold < 1,
            f"motivation.ema_threshold={m.ema_threshold} must be in [0, 1)",
        ),
        (m.qkv in ("split", "literal"), f"motivation.qkv={m.qkv!r} must be split or literal"),
        (
            m.condition != "random_b" or len(m.counts_from) > 0,
            "motivation.condition=random_b needs motivation.counts_from=[metrics.jsonl of "
            "earlier motivation runs]",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python (lists, dicts), anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def describe_fields() -> str:
    """Every recipe field with its default, one per line, for ``--help``."""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}")

    walk(TrainConfig(), "")
    return "\n".join(lines)
