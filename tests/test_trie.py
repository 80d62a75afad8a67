"""The trie of sub-networks' run paths: shared prefixes computed once."""

from __future__ import annotations

import nestedtrain as nt
from nestedtrain.elastic import build_trie, run_path


def test_the_step_trie_shares_prefixes_among_sub_networks():
    model = nt.create_model("resnet20", num_classes=10)
    subnets = [nt.Subnet.parse(model, s) for s in ("2-3-3", "2-3-1", "3-1-1")]
    root = build_trie([*subnets, nt.Subnet.full(model)])
    # The stem and the first two blocks are computed once for all four networks.
    assert len(root.children) == 1
    node = root.children["block", 0, 0].children["block", 0, 1]
    assert set(node.children) == {("block", 0, 2), ("block", 1, 0)}
    # 2-3-3 and 2-3-1 go on together through stage 2's first block.
    assert run_path(subnets[0])[:6] == run_path(subnets[1])[:6]
