"""Build the *full* variant: the original graph plus what the runtime must remember.

Contract: ``build_full_variant(gm, region)`` returns a new GraphModule with the same
placeholders as ``gm`` whose outputs are ``gm``'s outputs followed by the stack residual
``R = exit - stream_input`` (the total change the block stack, VACE branch included, made to
the token stream). ``gm`` is not modified; every original node keeps its ``meta``.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .graph_utils import copy_graph_module, finalize, output_node
from .token_region import TokenRegion


def build_full_variant(gm: fx.GraphModule, region: TokenRegion) -> fx.GraphModule:
    full = copy_graph_module(gm)
    by_name = {n.name: n for n in full.graph.nodes}
    exit_node, stream = by_name[region.exit], by_name[region.stream_input]
    with full.graph.inserting_after(exit_node):
        residual = full.graph.call_function(operator.sub, (exit_node, stream))
    residual.name = "hetcache_residual"
    residual.meta["example_value"] = exit_node.meta.get("example_value")
    output = output_node(full.graph)
    outputs = output.args[0]
    output.args = (tuple(outputs) + (residual,),)
    return finalize(full)
