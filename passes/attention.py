"""Find attention sites in a Dynamo graph.

Contract: ``find_attention_sites(gm, user_inputs)`` reads ``gm`` and returns one ``AttentionSite`` per
attention call, in graph order. A site is *self*-attention when its keys depend on exactly the user inputs
its queries depend on (keys come from the token stream), and *cross*-attention otherwise (keys come from
text or image conditioning only). The owning block comes from ``nn_module_stack``. The graph is not
modified. Under Ring context parallelism one self-attention is several attention ops over the gathered
keys; ``with_ring_sites`` makes them one site, the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import ancestors, call_argument, module_paths, owning_block, tensor_shape
from .errors import ShardingRefused
from .shards import attention_ops_reading, is_ring_site, ring_operands

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


_ALIASES = {"attn_mask": ("attn_mask", "attn_bias")}  # cuDNN's kernel calls its mask a bias


def attention_operand(node: fx.Node, index: int, name: str) -> fx.Node | None:
    """Query (0), key (1), value (2), mask (3) or ``is_causal`` (5) of an SDPA node, passed positionally or by
    keyword; of an aten attention kernel (flash, cuDNN: diffusers' backends under context parallelism), by
    ``name`` in its schema; of a ring site, this rank's query, key and value rows (``[B, n, H, D]``, no mask)."""
    if is_ring_site(node):
        return ring_operands(node)[index] if index < 3 else None
    schema = getattr(node.target, "_schema", None) or getattr(getattr(node.target, "default", None), "_schema", None)
    if schema is not None and node.target not in ATTENTION_TARGETS:  # an aten attention kernel: by its own names
        names = [argument.name for argument in schema.arguments]
        for alias in _ALIASES.get(name, (name,)):
            if alias in names:
                return call_argument(node, names.index(alias), alias)
        return None
    return call_argument(node, index, name)


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


def with_ring_sites(gm: fx.GraphModule, sites: list[AttentionSite], world: int) -> list[AttentionSite]:
    """``sites`` with each Ring self-attention's attention ops (one per rank's chunk of keys) replaced by
    one site: the gather of its keys and values (``shards.is_ring_site``)."""
    ring, inside = [], set()
    for node in gm.graph.nodes:
        if not is_ring_site(node):
            continue
        query, key, _value = ring_operands(node)
        ops = attention_ops_reading(query, position=0, name="query") if query is not None else []
        if not ops:
            raise ShardingRefused(f"Ring attention at '{node.name}': no attention op reads this rank's keys, so "
                                  "its queries are unknown (an attention backend hetcache does not know)")
        inside.update(op.name for op in ops)
        paths = module_paths(ops[0])
        ring.append(AttentionSite(node=node.name, module=paths[-1] if paths else "", block=owning_block(node),
                                  kind="self", num_queries=tensor_shape(query)[1],
                                  num_keys=world * tensor_shape(key)[1]))
    position = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return sorted([site for site in sites if site.node not in inside] + ring, key=lambda site: position[site.node])


def in_cache_layout(graph: fx.Graph, site: fx.Node, operand: fx.Node, before: fx.Node) -> fx.Node:
    """``operand`` of ``site`` laid out as caches are, ``[..., L, D]``: as it is for an attention op; for a ring
    site (``[B, n, H, D]``) transposed to ``[B, H, n, D]``, inserted before ``before``."""
    if not is_ring_site(site):
        return operand
    with graph.inserting_before(before):
        return graph.call_method("transpose", (operand, 1, 2))
