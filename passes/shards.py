"""Context parallelism: how a graph traced under diffusers' ``enable_parallelism`` is sharded.

Contract: ``find_shards(gm, region)`` returns None for a graph without collectives, a ``ShardLayout``
for one the variants can serve, and raises ``ShardingRefused`` naming the collective otherwise.

Served: Ulysses and Ring (not both at once). Each rank's graph splits the token stream into ``world`` equal
shards before the block stack (Dynamo bakes the rank in: ``chunk(world, dim=1)[rank]``), so the region runs on
``N / world`` tokens; every self-attention is an all-to-all of queries, keys and values (each rank then holds
all N tokens of ``heads / world`` heads), attention, and an all-to-all back; the shards are gathered after the
stack. Under Ring every self-attention instead gathers every rank's keys and values (an
``all_gather_into_tensor`` of ``cat([key.flatten(), value.flatten()])``) and runs one attention with
log-sum-exp per rank's chunk, merging them; a *ring site* is that gather, and ``ring_operands`` gives its
query, key and value (this rank's rows, ``[B, n, H, D]``). Refused: unequal splits (``ulysses_anything``),
Ulysses and Ring together, and any other collective inside the stack.

``all_to_all_equal`` and ``reshape_as_sent`` are what ``token_sizes.py`` rewrites the region's
all-to-alls and the reshapes after them into, so they run on a subset of each shard's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import ShardingRefused
from .graph_utils import call_argument
from .token_region import TokenRegion

_OPS = torch.ops._c10d_functional


@dataclass(frozen=True)
class ShardLayout:
    """A sharded graph: ``world`` ranks of the process group named ``group``; ``scheme`` "ulysses" or "ring"."""

    world: int
    group: str
    scheme: str = "ulysses"


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
        if name not in ("all_to_all_single", "wait_tensor") and not is_ring_site(node):
            raise ShardingRefused(f"the block stack holds the collective {name} ('{node.name}'), which is neither a "
                                 "Ulysses all-to-all nor a Ring gather of keys and values")
    exchanges = [node for node, name in inside if name == "all_to_all_single"]
    rings = [node for node, _ in inside if is_ring_site(node)]
    if exchanges and rings:
        raise ShardingRefused("the block stack mixes Ulysses all-to-alls and Ring gathers (ulysses_degree and "
                             "ring_degree both above 1): use one of them")
    if rings:
        return ShardLayout(world=rings[0].args[1], group=rings[0].args[2], scheme="ring")
    if not exchanges:
        raise ShardingRefused("the graph holds collectives but no all-to-all in the block stack: a context-parallel "
                             "layout hetcache does not know")
    layouts = {_layout_of(node) for node in exchanges}
    if len(layouts) != 1 or None in layouts:
        raise ShardingRefused(f"the all-to-all '{exchanges[0].name}' splits unequally (ulysses_anything): "
                             "partial steps need equal shards")
    return layouts.pop()


def _layout_of(node: fx.Node) -> ShardLayout | None:
    _x, out_sizes, in_sizes, group = node.args[:4]
    if not out_sizes or list(out_sizes) != list(in_sizes) or len(set(out_sizes)) != 1:
        return None
    return ShardLayout(world=len(out_sizes), group=group)


def is_ring_site(node: fx.Node) -> bool:
    """An ``all_gather_into_tensor`` of ``cat([key.flatten(), value.flatten()])`` (Ring attention's)."""
    if collective_name(node) != "all_gather_into_tensor":
        return False
    joined = node.args[0]
    if isinstance(joined, fx.Node) and joined.target == "contiguous":
        joined = joined.args[0]
    if not (isinstance(joined, fx.Node) and joined.target in (torch.cat, torch.concat)):
        return False
    parts = joined.args[0]
    return len(parts) == 2 and all(isinstance(p, fx.Node) and p.target in ("flatten", torch.flatten) for p in parts)


def ring_operands(gather: fx.Node) -> tuple[fx.Node | None, fx.Node, fx.Node]:
    """Query, key and value of a ring site: the key and value gathered, and the query of the attention op
    that reads this rank's own keys (through transposes and ``contiguous``); None if there is none."""
    joined = gather.args[0]
    if joined.target == "contiguous":
        joined = joined.args[0]
    key, value = (part.args[0] for part in joined.args[0])
    for op in attention_ops_reading(key, position=1, name="key"):
        return layout_source(call_argument(op, 0, "query")), key, value
    return None, key, value


def attention_ops_reading(node: fx.Node, position: int, name: str) -> list[fx.Node]:
    """The attention ops (an op whose name says so) that take ``node``, through transposes and ``contiguous``,
    as their argument ``name`` (at ``position`` when passed positionally)."""
    laid_out, found = [node], []
    for source in laid_out:
        for user in source.users:
            if _is_layout_op(user):
                laid_out.append(user)
            elif (user.op == "call_function" and "attention" in str(getattr(user.target, "__name__", user.target))
                  and call_argument(user, position, name) is source and user not in found):
                found.append(user)
    return found


def _is_layout_op(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("transpose", "contiguous")) or node.target in (
        torch.transpose, torch.Tensor.contiguous)


def layout_source(node: fx.Node) -> fx.Node:
    """``node`` before the transposes and copies that only change its memory layout."""
    while _is_layout_op(node):
        node = node.args[0]
    return node


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
