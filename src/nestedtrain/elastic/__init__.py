"""Elastic sub-networks of unmodified models: stages, Subnets, samplers, and running a model
piece by piece (stem, blocks, head) to compute shared prefixes once."""

from .sampling import (
    SAMPLING_SPACES,
    OrderedSampler,
    StochasticSampler,
    build_sampler,
    space_subnets,
    subnets_from_spec,
)
from .split import ModelSplit, SplitError
from .stages import (
    SUPPORTED_FAMILIES,
    Stage,
    StageSpec,
    declare_stages,
    find_stages,
    model_family,
    unwrap,
)
from .subnet import Subnet, export_subnet, use_subnet
from .trie import TrieNode, build_trie, run_path, walk_trie

__all__ = [
    "ModelSplit",
    "SplitError",
    "TrieNode",
    "build_trie",
    "run_path",
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
    "model_family",
    "space_subnets",
    "subnets_from_spec",
    "unwrap",
    "use_subnet",
    "walk_trie",
]
