"""Extract the timestep-embedding probe: a tiny graph computing the modulation signal.

Contract:
- ``find_timestep_input(gm, user_inputs, stream_sources)`` names the user input that is the
  diffusion timestep: a floating input of at most 2 dims (``[B]`` or ``[B, seq]``), not a source of
  the token stream, whose values reach a ``sin`` or ``cos`` (the sinusoidal timestep embedding
  every DiT starts with). None when there is none (a model that is not a denoiser).
- ``find_modulation(gm, region, timestep_input)`` names the region input computed from the
  timestep and not from the token stream: the per-step modulation tensor the blocks read (Wan's
  ``timestep_proj``; SD3's, which also reads the pooled text). Tensors that depend on the timestep
  alone are preferred, then the largest. Returns None when there is none.
``extract_probe(gm, node_name)`` returns a new GraphModule with the same placeholders as ``gm``
whose only output is that tensor; ``gm`` is not modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import (
    ancestors,
    copy_graph_module,
    example_value,
    finalize,
    output_node,
    placeholders,
    prune_dead_nodes,
    tensor_shape,
)
from .token_region import TokenRegion


@dataclass(frozen=True)
class ModulationSignal:
    node: str
    timestep_input: str
    shape: tuple[int, ...]


_SINUSOIDS = {torch.sin, torch.cos, "sin", "cos"}


def find_timestep_input(gm: fx.GraphModule, user_inputs: set[str], stream_sources: frozenset[str]) -> str | None:
    sinusoids = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in _SINUSOIDS]
    feeding = ancestors(sinusoids, values_only=True)
    for node in placeholders(gm.graph):
        value = example_value(node)
        if (node.name in user_inputs and node.name not in stream_sources and node in feeding
                and isinstance(value, torch.Tensor) and value.dim() <= 2 and value.dtype != torch.bool):
            return node.name
    return None


def find_modulation(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str],
                    timestep_input: str | None) -> ModulationSignal | None:
    if timestep_input is None:
        return None
    by_name = {n.name: n for n in gm.graph.nodes}
    best, best_rank = None, None
    for name in region.inputs:
        node = by_name[name]
        shape = tensor_shape(node)
        if node.op == "placeholder" or shape is None:
            continue
        sources = {n.name for n in ancestors([node], values_only=True)
                   if n.op == "placeholder" and n.name in user_inputs}
        if timestep_input not in sources or sources & region.stream_sources:
            continue
        rank = (sources == {timestep_input}, math.prod(shape))
        if best_rank is None or rank > best_rank:
            best, best_rank = ModulationSignal(node=name, timestep_input=timestep_input, shape=shape), rank
    return best


def extract_probe(gm: fx.GraphModule, node_name: str) -> fx.GraphModule:
    probe = copy_graph_module(gm)
    target = next(n for n in probe.graph.nodes if n.name == node_name)
    output = output_node(probe.graph)
    output.args = ((target,),)
    prune_dead_nodes(probe.graph)
    return finalize(probe)
