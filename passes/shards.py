"""Context parallelism: how a graph traced under diffusers' ``enable_parallelism`` is sharded.

Contract: ``find_shards(gm, region)`` returns None for a graph without collectives, a ``ShardLayout``
for one the variants can serve, and raises ``RewriteRefused`` naming the collective otherwise.

Served: Ulysses. Each rank's graph splits the token stream into ``world`` equal shards before the block
stack (Dynamo bakes the rank in: ``chunk(world, dim=1)[rank]``), so the region runs on ``N / world``
tokens; every self-attention is an all-to-all of queries, keys and values (each rank then holds all N
tokens of ``heads / world`` heads), attention, and an all-to-all back; the shards are gathered after the
stack. Inside the region only equal-split ``all_to_all_single`` may run (and ``wait_tensor``): Ring
attention's gathers of keys and values, or unequal splits (``ulysses_anything``), are refused.

``all_to_all_equal`` and ``reshape_as_sent`` are what ``token_sizes.py`` rewrites the region's
all-to-alls and the reshapes after them into, so they run on a subset of each shard's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import RewriteRefused
from .token_region import TokenRegion

_OPS = torch.ops._c10d_functional


@dataclass(frozen=True)
class ShardLayout:
    """A Ulysses-sharded graph: ``world`` ranks of the process group named ``group``."""

    world: int
    group: str


def collective_name(node: fx.Node) -> str | None:
    """``"all_to_all_single"`` & co. for a functional collective op, else None."""
    name = getattr(node.target, "_qualified_op_name", None) or getattr(node.target, "__module__", None) or ""
    if node.op != "call_function" or not ("c10d" in name or name.startswith("torch.distributed")):
        return None
    return name.split("::")[-1]


def find_shards(gm: fx.GraphModule, region: TokenRegion) -> ShardLayout | None:
    collectives = [(node, collective_name(node)) for node in gm.graph.nodes if collective_name(node)]
    if not collectives:
        return None
    inside = [(node, name) for node, name in collectives if node.name in region.nodes]
    for node, name in inside:
        if name not in ("all_to_all_single", "wait_tensor"):
            raise RewriteRefused(f"the block stack holds the collective {name} ('{node.name}'): context parallelism "
                                 "other than Ulysses (Ring attention) is not rewritten; use ulysses_degree")
    exchanges = [node for node, name in inside if name == "all_to_all_single"]
    if not exchanges:
        raise RewriteRefused("the graph holds collectives but no all-to-all in the block stack: a context-parallel "
                             "layout hetcache does not know")
    layouts = {_layout_of(node) for node in exchanges}
    if len(layouts) != 1 or None in layouts:
        raise RewriteRefused(f"the all-to-all '{exchanges[0].name}' splits unequally (ulysses_anything): "
                             "partial steps need equal shards")
    return layouts.pop()


def _layout_of(node: fx.Node) -> ShardLayout | None:
    _x, out_sizes, in_sizes, group = node.args[:4]
    if not out_sizes or list(out_sizes) != list(in_sizes) or len(set(out_sizes)) != 1:
        return None
    return ShardLayout(world=len(out_sizes), group=group)


def all_to_all_equal(tensor: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """``all_to_all_single`` of a flat ``tensor`` in ``world`` equal parts (sizes read from ``tensor``)."""
    part = tensor.numel() // world
    return _OPS.all_to_all_single(tensor, [part] * world, [part] * world, group)


def reshape_as_sent(received: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """The received half of an equal-split all-to-all, in the shape the flat tensor sent had."""
    return received.reshape(sent.shape)


def split_rows(tensor: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """``tensor`` with ``dim`` split into ``(parts, size // parts)`` (the token rows of each rank)."""
    return tensor.reshape(*tensor.shape[:dim], parts, -1, *tensor.shape[dim + 1:])
