"""Elastic sub-networks of unmodified models: stages, Subnets, samplers."""

from .sampling import SAMPLING_SPACES, OrderedSampler, StochasticSampler, build_sampler
from .stages import SUPPORTED_FAMILIES, Stage, StageSpec, declare_stages, find_stages, unwrap
from .subnet import Subnet, export_subnet, use_subnet

__all__ = [
    "SAMPLING_SPACES",
    "SUPPORTED_FAMILIES",
    "OrderedSampler",
    "Stage",
    "StageSpec",
    "StochasticSampler",
    "Subnet",
    "build_sampler",
    "declare_stages",
    "export_subnet",
    "find_stages",
    "unwrap",
    "use_subnet",
]
