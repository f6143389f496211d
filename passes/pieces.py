"""Split a variant graph at its block boundaries, so that a repeated block is compiled once.

Contract: ``split_into_pieces(gm, stacks)`` returns a new GraphModule whose graph calls submodules
``piece_0``, ``piece_1``, ... in order and computes what ``gm`` computes, with ``gm``'s placeholders
and outputs; ``gm`` is not modified. Each block of the named ``stacks`` (the nodes a ``<stack>.<index>``
module owns, by ``nn_module_stack``) is one piece, and so is each stretch of code between blocks: the
prologue before the first block, top-level code between two blocks (VACE adds its control hints there),
the epilogue after the last. A node no module owns that lies between two nodes of the same block (a pass
inserted it there: the join of cached and fresh keys before an attention) belongs to that block.

``piece_key(piece)`` is a piece's code with every name erased: the blocks of one stack, which differ only
in which parameters they are given, get one key, so the piece compiler compiles one of them and calls it
for all (as vLLM's piecewise backend and diffusers' regional compilation do).

>>> import torch, torch.fx as fx
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.proj = torch.nn.Linear(4, 4)
...     def forward(self, x):
...         return x + self.proj(x).relu()
>>> class Stack(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
...     def forward(self, x):
...         x = x * 2
...         for block in self.blocks:
...             x = block(x)
...         return (x.sum(),)
>>> captured = []
>>> _ = torch.compile(Stack(), backend=lambda gm, _: captured.append(gm) or gm.forward)(torch.ones(2, 4))
>>> split = split_into_pieces(captured[0], ("blocks",))
>>> [name for name, _ in split.named_children()]
['piece_0', 'piece_1', 'piece_2', 'piece_3', 'piece_4']
>>> len({piece_key(split.piece_1), piece_key(split.piece_2), piece_key(split.piece_3)})
1
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from .graph_utils import finalize, owning_block, split_block_path

PIECE_PREFIX = "piece"


def piece_labels(gm: fx.GraphModule, stacks: Sequence[str]) -> dict[fx.Node, int]:
    """Each computing node's piece: consecutive pieces in graph order, a new one at every block boundary."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    blocks = [_block_of(n, stacks) for n in nodes]
    _fill_blocks_inside(blocks)
    labels, piece, previous = {}, -1, object()
    for node, block in zip(nodes, blocks):
        if block != previous:
            piece, previous = piece + 1, block
        labels[node] = piece
    return labels


def split_into_pieces(gm: fx.GraphModule, stacks: Sequence[str]) -> fx.GraphModule:
    """``gm`` as a chain of pieces (see the module docstring)."""
    labels = piece_labels(gm, stacks)
    split = split_module(gm, None, lambda node: labels[node], keep_original_order=True,
                         keep_original_node_name=True, partition_affix=None, tuple_return=True)
    _rename_pieces(split)
    return finalize(split)


def pieces(split: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The pieces of a split graph, in the order it calls them."""
    return [(node.target, split.get_submodule(node.target)) for node in split.graph.nodes
            if node.op == "call_module"]


def piece_key(piece: fx.GraphModule) -> str:
    """A digest of ``piece``'s code with names erased: equal for pieces that compute the same function of
    their inputs (same ops, same constants, inputs in the same order)."""
    index: dict[fx.Node, int] = {}
    parts = []
    for position, node in enumerate(piece.graph.nodes):
        index[node] = position
        args = fx.node.map_arg((node.args, node.kwargs), lambda arg: _NodeRef(index[arg]))
        parts.append(f"{node.op}|{_target_name(node)}|{args!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class _NodeRef:
    """Stands for an argument node in ``piece_key``: its position, not its name."""

    def __init__(self, position: int):
        self.position = position

    def __repr__(self) -> str:
        return f"%{self.position}"


def _target_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return ""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _block_of(node: fx.Node, stacks: Sequence[str]) -> str | None:
    block = owning_block(node)
    if block is None or split_block_path(block)[0] not in stacks:
        return None
    return block


def _fill_blocks_inside(blocks: list[str | None]) -> None:
    """Give an unowned node between two nodes of the same block that block, in place."""
    last_block, last_position = None, -1
    for position, block in enumerate(blocks):
        if block is None:
            continue
        if block == last_block:
            for inside in range(last_position + 1, position):
                blocks[inside] = block
        last_block, last_position = block, position


def _rename_pieces(split: fx.GraphModule) -> None:
    """``submod_3`` -> ``piece_3``: the names the runtime, the dumps and the logs use."""
    for node in split.graph.nodes:
        if node.op == "call_module" and node.target.startswith("submod_"):
            name = f"{PIECE_PREFIX}_{node.target.removeprefix('submod_')}"
            setattr(split, name, split.get_submodule(node.target))
            delattr(split, node.target)
            node.target = name
