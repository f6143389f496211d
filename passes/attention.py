"""Find attention sites in a Dynamo graph.

Contract: ``find_attention_sites(gm, user_inputs)`` reads ``gm`` and returns one
``AttentionSite`` per attention call, in graph order. A site is *self*-attention when its keys
depend on exactly the user inputs its queries depend on (keys come from the token stream), and
*cross*-attention otherwise (keys come from text or image conditioning only).
The owning block comes from ``nn_module_stack``. The graph is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import ancestors, module_paths, owning_block, tensor_shape

ATTENTION_TARGETS: tuple = (
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


@dataclass(frozen=True)
class AttentionSite:
    """One attention call. ``num_queries``/``num_keys`` are sequence lengths (dim -2 of q/k)."""

    node: str
    module: str
    block: str | None
    kind: str  # "self" or "cross"
    num_queries: int
    num_keys: int


def is_attention(node: fx.Node) -> bool:
    """SDPA in any of its Dynamo spellings, or a custom op whose name says it is attention."""
    if node.op != "call_function":
        return False
    if node.target in ATTENTION_TARGETS:
        return True
    name = str(getattr(node.target, "__name__", node.target))
    return isinstance(node.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket) and "attention" in name


def attention_operand(node: fx.Node, index: int, name: str) -> fx.Node | None:
    """Query (0), key (1) or value (2) of an attention node, passed positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _seq_len(node: fx.Node) -> int:
    shape = tensor_shape(node)
    return shape[-2] if shape and len(shape) >= 2 else -1


def _input_sources(node: fx.Node, user_inputs: set[str]) -> set[str]:
    return {n.name for n in ancestors([node]) if n.op == "placeholder" and n.name in user_inputs}


def find_attention_sites(gm: fx.GraphModule, user_inputs: set[str]) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        query, key = attention_operand(node, 0, "query"), attention_operand(node, 1, "key")
        if not isinstance(query, fx.Node) or not isinstance(key, fx.Node):
            continue
        same_sources = _input_sources(key, user_inputs) == _input_sources(query, user_inputs)
        kind = "self" if same_sources else "cross"
        paths = module_paths(node)
        sites.append(
            AttentionSite(
                node=node.name,
                module=paths[-1] if paths else "",
                block=owning_block(node),
                kind=kind,
                num_queries=_seq_len(query),
                num_keys=_seq_len(key),
            )
        )
    return sites
