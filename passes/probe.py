"""Extract the timestep-embedding probe: a tiny graph computing the modulation signal.

Contract: ``find_modulation(gm, region, user_inputs)`` names the region input that depends on
exactly one user input, a small one (at most 2-D: the timestep, ``[B]`` or ``[B, seq]``), and
not on the token stream: the per-step modulation tensor the blocks read (Wan's
``timestep_proj``). The largest such tensor wins. Returns None when there is none.
``extract_probe(gm, node_name)`` returns a new GraphModule with the same placeholders as ``gm``
whose only output is that tensor; ``gm`` is not modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from .graph_utils import ancestors, copy_graph_module, finalize, output_node, prune_dead_nodes, tensor_shape
from .token_region import TokenRegion


@dataclass(frozen=True)
class ModulationSignal:
    node: str
    timestep_input: str
    shape: tuple[int, ...]


def find_modulation(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str]) -> ModulationSignal | None:
    by_name = {n.name: n for n in gm.graph.nodes}
    best = None
    for name in region.inputs:
        node = by_name[name]
        shape = tensor_shape(node)
        if node.op == "placeholder" or shape is None:
            continue
        sources = [n for n in ancestors([node], values_only=True) if n.op == "placeholder" and n.name in user_inputs]
        if len(sources) != 1 or sources[0].name in region.stream_sources:
            continue
        source_shape = tensor_shape(sources[0])
        if source_shape is None or len(source_shape) > 2:
            continue
        if best is None or math.prod(shape) > math.prod(best.shape):
            best = ModulationSignal(node=name, timestep_input=sources[0].name, shape=shape)
    return best


def extract_probe(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    probe = copy_graph_module(gm)
    target = next(n for n in probe.graph.nodes if n.name == node_name)
    output = output_node(probe.graph)
    output.args = ((target,),)
    prune_dead_nodes(probe.graph)
    return finalize(probe)
