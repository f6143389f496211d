"""Find the token region: the block stack between patch embedding and output head.

Contract: ``find_token_region(gm)`` reads ``gm`` and returns a ``TokenRegion`` or raises
``RewriteRefused`` with a one-line reason. The region starts at the first node owned by a
repeated block (a module path ``<stack>.<index>``, e.g. ``vace_blocks.0`` or ``blocks.0``) and
ends at its *exit*: the output of the last block of the main stack, followed through the
top-level residual additions that come right after it (Wan VACE adds its control hints there).

The region must be a clean subgraph for the reuse rewrite to be exact: only the exit may be used
after it, and the main token stream must enter it as a single tensor shaped like the exit.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import NoBlockStack, RewriteRefused
from .graph_utils import ancestors, describe, owning_block, split_block_path, tensor_shape

_ADD_TARGETS = (operator.add, torch.add, operator.iadd)


@dataclass(frozen=True)
class TokenRegion:
    """Where the block stack lives in the graph (all nodes named, never held)."""

    stacks: tuple[tuple[str, int], ...]  # (stack name, number of blocks), in graph order
    main_stack: str
    nodes: frozenset[str]
    entry: str  # first node of the region
    exit: str  # the only region value used after the region
    stream_input: str  # main token stream entering the region
    stream_sources: frozenset[str]  # graph inputs the stream is computed from (the latents, their pre-processing)
    inputs: tuple[str, ...]  # every value defined before the region and used inside it
    exit_shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.exit_shape[1]


def _block_output(nodes: list[fx.Node], block: str) -> fx.Node:
    owned = {n for n in nodes if owning_block(n) == block}
    escaping = [n for n in owned if any(u not in owned for u in n.users)]
    tensors = [n for n in escaping if tensor_shape(n) is not None and len(tensor_shape(n)) == 3]
    if len(tensors) != 1:
        names = ", ".join(sorted({describe(n) for n in tensors})) or "none"
        raise RewriteRefused(f"block {block} does not return exactly one 3-D token tensor (it returns: {names}); "
                             "hetcache needs the last block to return the single token stream")
    return tensors[0]


def _follow_residual_adds(node: fx.Node) -> fx.Node:
    """Walk through top-level ``x + hint`` additions that directly follow the last block."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        is_add = user.op == "call_function" and user.target in _ADD_TARGETS
        if not is_add or owning_block(user) is not None or tensor_shape(user) != tensor_shape(node):
            break
        node = user
    return node


def _in_block(node: fx.Node) -> bool:
    """Owned by a block, and not the context-parallel split diffusers' hook on the block does before it
    (``chunk`` of a token tensor ``[B, N, C]`` from outside the block, and the item of it this rank keeps)."""
    block = owning_block(node)
    if block is None:
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    is_split = node.target in ("chunk", torch.chunk, "tensor_split", torch.tensor_split)
    source = node.args[0] if is_split else None
    return not (isinstance(source, fx.Node) and owning_block(source) != block and len(tensor_shape(source) or ()) == 3)


def _depends_on_region(node: fx.Node, region: set[fx.Node]) -> bool:
    return any(arg in region for arg in node.all_input_nodes)


def find_token_region(gm: fx.GraphModule, user_inputs: set[str] | None = None,
                      attention_blocks: Iterable[str | None] | None = None) -> TokenRegion:
    """``attention_blocks``: the blocks attention sites lie in; only stacks holding one count (a ``ffn.net.0`` of
    a feed-forward network or a ``time_embedding.0`` of an ``nn.Sequential`` is no block stack)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    with_attention = (None if attention_blocks is None
                      else {split_block_path(block)[0] for block in attention_blocks if block is not None})

    def in_stack(node: fx.Node) -> bool:
        return _in_block(node) and (with_attention is None or split_block_path(owning_block(node))[0] in with_attention)

    block_nodes = [n for n in nodes if in_stack(n) and n.op != "placeholder"]
    if not block_nodes:
        raise NoBlockStack("no repeated transformer blocks ('<stack>.<index>' modules) in the graph")

    stacks: dict[str, set[int]] = {}
    for node in block_nodes:
        stack, index = split_block_path(owning_block(node))
        stacks.setdefault(stack, set()).add(index)
    last_block = owning_block(block_nodes[-1])
    main_stack, _ = split_block_path(last_block)

    exit_node = _follow_residual_adds(_block_output(nodes, last_block))
    start, stop = position[block_nodes[0]], position[exit_node]
    region: set[fx.Node] = set()
    for node in nodes[start : stop + 1]:
        if in_stack(node) or _depends_on_region(node, region):
            region.add(node)
    # the last block may go on after the exit on a stream nothing reads (CogVideoX's text stream)
    region.update(node for node in nodes[stop + 1:] if in_stack(node) and node.op != "placeholder")

    for node in region:
        if node is exit_node:
            continue
        outside = [u for u in node.users if u not in region]
        if outside:
            raise RewriteRefused(
                f"{describe(node)} inside the block stack is also used after it (by {describe(outside[0])}); "
                "hetcache needs the stack to hand a single token stream to the output head (two-stream "
                "blocks whose second stream leaves the stack are not supported yet)"
            )

    inputs = sorted({a for n in region for a in n.all_input_nodes if a not in region}, key=position.get)
    first_main = f"{main_stack}.{min(stacks[main_stack])}"
    exit_shape = tensor_shape(exit_node)
    ordered_stacks = sorted(stacks, key=lambda s: min(position[n] for n in block_nodes
                                                       if split_block_path(owning_block(n))[0] == s))
    # the stream enters the main stack's first block; or, when that block reads it from an earlier stack
    # (Flux's and HunyuanVideo's single-stream blocks after their two-stream blocks), the stack before it
    stream_candidates = []
    for first in (first_main, *(f"{s}.{min(stacks[s])}" for s in ordered_stacks if s != main_stack)):
        stream_candidates = [a for a in inputs
                             if tensor_shape(a) == exit_shape and any(owning_block(u) == first for u in a.users)]
        if len(stream_candidates) > 1 and user_inputs is not None:
            # tables shaped like the stream but computed from no input (LTX's RoPE) are not the stream
            stream_candidates = [a for a in stream_candidates if any(
                n.op == "placeholder" and n.name in user_inputs for n in ancestors([a], values_only=True))]
        if stream_candidates:
            first_main = first
            break
    if len(stream_candidates) != 1:
        why = (f"none of its inputs has the stack output's shape {list(exit_shape)} (the blocks change the "
               "sequence, e.g. text tokens joined to image tokens)" if not stream_candidates else
               f"{len(stream_candidates)} of its inputs have the stack output's shape {list(exit_shape)} "
               f"({', '.join(sorted({describe(a) for a in stream_candidates}))})")
        raise RewriteRefused(f"cannot tell which input of {first_main} is the token stream: {why}; hetcache "
                             "needs one stream of that shape carried from the first block to the last")

    return TokenRegion(
        stacks=tuple((s, len(stacks[s])) for s in ordered_stacks),
        main_stack=main_stack,
        nodes=frozenset(n.name for n in region),
        entry=block_nodes[0].name,
        exit=exit_node.name,
        stream_input=stream_candidates[0].name,
        stream_sources=frozenset(n.name for n in ancestors([stream_candidates[0]]) if n.op == "placeholder"),
        inputs=tuple(a.name for a in inputs),
        exit_shape=exit_shape,
    )
