"""Build the *reuse* variant: skip the whole block stack, add the cached residual.

Contract: ``build_reuse_variant(gm, region)`` returns a new GraphModule whose placeholders are
``gm``'s followed by one more, ``hetcache_residual`` (shaped like the region exit). Every use
of the region exit is replaced by ``stream_input + hetcache_residual`` and the block stack
(VACE blocks included) is deleted, so the prologue and epilogue run on the new timestep while
no block runs. Outputs have ``gm``'s structure. ``gm`` is not modified.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .graph_utils import copy_graph_module, finalize, placeholders, prune_dead_nodes
from .token_region import TokenRegion
from .variant_io import RESIDUAL_INPUT


def build_reuse_variant(gm: fx.GraphModule, region: TokenRegion) -> fx.GraphModule:
    reuse = copy_graph_module(gm)
    graph = reuse.graph
    by_name = {n.name: n for n in graph.nodes}
    exit_node, stream = by_name[region.exit], by_name[region.stream_input]

    with graph.inserting_after(placeholders(graph)[-1]):
        residual = graph.placeholder(RESIDUAL_INPUT)
    residual.meta["example_value"] = exit_node.meta.get("example_value")
    with graph.inserting_after(exit_node):
        reused = graph.call_function(operator.add, (stream, residual))
    reused.meta["example_value"] = exit_node.meta.get("example_value")
    exit_node.replace_all_uses_with(reused, delete_user_cb=lambda user: user is not reused)
    prune_dead_nodes(graph)
    return finalize(reuse)
