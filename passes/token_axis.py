"""Token axis: which region inputs carry tokens, and proof that the region is token-local.

Contract:
- ``find_token_inputs(gm, region, user_inputs, hints)`` returns ``{input name: token dim}`` for the
  region inputs that carry one row per token (the hidden stream, the control stream, the RoPE
  tables), and for graph inputs ``hints`` name as token tables (``hints.py``). Which inputs those
  are is decided from the graph's structure, never from sizes alone (a hidden size can equal the
  token count: Wan 1.3B at 256x256 x 21 frames has 1536 of each): the stream is one by definition;
  another token input's values derive only from video inputs (5-D user inputs such as the latents and
  VACE's control video) or from no user input at all (position tables built from buffers). The
  timestep modulation and the text embeddings derive from other inputs and are never token
  inputs. Within a token input the token axis is the first dimension of size ``num_tokens``, as in
  every DiT layout ``[B, N, ...]``; the fake-tensor check below catches a wrong pick.
- ``check_token_local(original, rewritten, region, num_selected)`` compares the shapes Dynamo
  recorded in ``original`` with those of ``rewritten`` propagated on fake tensors with
  ``num_selected`` tokens. Every region op that reads a token axis must keep it (row i of its
  output depends on row i of its inputs only); the first op that drops it, or that hard-codes
  the token count, refuses the rewrite with its name. Self-attention is the one exception and
  is rewritten before the check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import RewriteRefused
from .graph_utils import (
    ancestors,
    describe,
    example_value,
    placeholders,
    quiet_fake_tensor_errors,
    reads_scalars,
    static_fake_mode,
    tensor_shape,
)
from .hints import GraphHints
from .token_region import TokenRegion

GATHER_PREFIX = "hetcache_gather"


def find_token_inputs(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str],
                      hints: GraphHints = GraphHints()) -> dict[str, int]:
    by_name = {n.name: n for n in gm.graph.nodes}
    video_inputs = {n.name for n in placeholders(gm.graph)
                    if n.name in user_inputs and len(tensor_shape(n) or ()) == 5}
    stream = by_name[region.stream_input]
    if not any(n.name in video_inputs or _is_packed_latent(n, user_inputs, region.num_tokens)
               for n in ancestors([stream], values_only=True) if n.op == "placeholder"):
        raise RewriteRefused(f"the token stream entering {region.main_stack} is computed from neither a 5-D video "
                             f"input nor packed latents [B, {region.num_tokens}, C]")
    token_inputs = {region.stream_input: 1}  # the stream is [B, N, C] by the region's definition
    # a hinted table the region reads through the prologue (Flux's image ids, from which the prologue
    # computes RoPE tables of its text and image rows) is gathered at the graph input
    upstream = [n.name for n in placeholders(gm.graph)
                if n.name in user_inputs and n.name not in region.inputs and hints.token_table_dim(n.name) is not None]
    for name in [*region.inputs, *upstream]:
        node = by_name[name]
        shape = tensor_shape(node)
        if name in token_inputs or shape is None or hints.is_text(name):
            continue
        hinted = hints.token_table_dim(name) if node.op == "placeholder" else None
        if hinted is not None and -len(shape) <= hinted < len(shape) and shape[hinted] == region.num_tokens:
            token_inputs[name] = hinted % len(shape)
            continue
        if node.op == "placeholder" and name not in user_inputs:
            continue  # parameters and buffers
        sources = {n.name for n in ancestors([node], values_only=True)
                   if n.op == "placeholder" and n.name in user_inputs}
        if not sources <= video_inputs:
            continue  # derived from the timestep or the text: no token axis, whatever its sizes
        dims = [i for i, size in enumerate(shape) if size == region.num_tokens]
        if dims:
            token_inputs[name] = dims[0]
    return token_inputs


@dataclass(frozen=True)
class TokenGrid:
    """How tokens tile the latent video: ``grid`` = (F', H', W') tokens of ``patch`` latent cells.

    Latents that come packed, one row per token (``[B, N, C]``: LTX-Video), have no grid in the graph:
    ``grid`` and ``patch`` are None and the edit mask must be given as a token grid of ``num_tokens``."""

    latent_input: str
    latent_shape: tuple[int, ...]
    grid: tuple[int, int, int] | None
    patch: tuple[int, int, int] | None
    num_tokens: int = 0

    @property
    def packed(self) -> bool:
        return self.grid is None


def find_token_grid(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str],
                    hints: GraphHints = GraphHints(), world: int = 1) -> TokenGrid | None:
    """The 5-D latent input of the token stream and the patch grid it is cut into, if any.

    The grid is read from the 5-D patchified tensor the stream is computed from (``[B, C, F', H', W']``
    after a 3-D patch embedding); latents laid out frames first (``hints.frames_first``), patchified
    frame by frame, get the one patch of 1-2 frames and 1-8 cells whose grid has ``num_tokens``.
    ``latent_shape`` is always ``[B, C, F, H, W]``. Under context parallelism the region holds one of
    ``world`` shards of the tokens; the grid is that of all of them."""
    num_tokens = region.num_tokens * world
    stream = next(n for n in gm.graph.nodes if n.name == region.stream_input)
    found = ancestors([stream])
    latents = [n for n in found if n.op == "placeholder" and n.name in user_inputs
               and len(tensor_shape(n) or ()) == 5]
    packed = [n for n in found if n.op == "placeholder" and _is_packed_latent(n, user_inputs, num_tokens)]
    if not latents and len(packed) == 1:
        return TokenGrid(packed[0].name, tensor_shape(packed[0]), None, None, num_tokens)
    if len(latents) != 1:
        return None
    latent_shape = tensor_shape(latents[0])
    if hints.frames_first:
        batch, frames, channels, height, width = latent_shape
        latent_shape = (batch, channels, frames, height, width)
        grids = [tuple(size // p for size, p in zip(latent_shape[2:], patch)) for patch in _FRAME_PATCHES
                 if all(size % p == 0 for size, p in zip(latent_shape[2:], patch))]
        grids = [grid for grid in grids if math.prod(grid) == num_tokens]
    else:
        grids = [tuple(tensor_shape(n)[2:]) for n in found if n.op != "placeholder"
                 and len(tensor_shape(n) or ()) == 5 and math.prod(tensor_shape(n)[2:]) == num_tokens]
    if not grids or any(size % g for size, g in zip(latent_shape[2:], grids[0])):
        return None
    grid = grids[0]
    patch = tuple(size // g for size, g in zip(latent_shape[2:], grid))
    return TokenGrid(latent_input=latents[0].name, latent_shape=latent_shape, grid=grid, patch=patch,
                     num_tokens=num_tokens)


def _is_packed_latent(node: fx.Node, user_inputs: set[str], num_tokens: int) -> bool:
    """A user input of one row per token, ``[B, N, C]`` (LTX-Video's packed latents)."""
    shape = tensor_shape(node)
    return node.name in user_inputs and shape is not None and len(shape) == 3 and shape[1] == num_tokens


_FRAME_PATCHES = [(t, p, p) for t in (1, 2) for p in (1, 2, 4, 8)]


def propagate_fake_shapes(gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
    """Fill ``node.meta['val']`` of ``gm`` by running it on fake copies of ``example_inputs``.

    Errors propagate (callers turn them into refusals); torch's own traceback log is silenced.
    """
    mode = static_fake_mode(scalars=reads_scalars(gm))
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with quiet_fake_tensor_errors():
        FakeTensorProp(gm, mode).propagate(*fakes)


def _token_dims(original: tuple[int, ...], new: tuple[int, ...], tokens: int, selected: int,
                world: int = 1) -> list[int]:
    """The extra (non-token) rows of each dim that lost exactly the unselected tokens: 0 for a pure
    token axis, the text rows for a text + image sequence. Under context parallelism (``world`` > 1) a dim
    of every rank's tokens, or a flat dim of ``k`` values per token, lost ``world`` or ``k`` times as many."""
    if len(original) != len(new):
        return []
    dims = [a - tokens for a, b in zip(original, new) if a >= tokens and a - b == tokens - selected]
    if world > 1:
        dims += [0 for a, b in zip(original, new) if a - b > tokens - selected
                 and (a - b) % (tokens - selected) == 0 and a == (a - b) // (tokens - selected) * tokens]
    return dims


_ROW_SELECTIONS = {operator.getitem, torch.narrow, "narrow"}


def _selects_extra_rows(node: fx.Node, shape: tuple[int, ...], unchanged: bool, extras: set[int]) -> bool:
    """Whether ``node`` cuts the non-token rows out of a sequence that also holds tokens (CogVideoX's text
    rows out of its text + video sequence): a row selection whose output, the same in both graphs, has
    as many rows as the sequence has non-token rows. A reduction over tokens does not pass."""
    return node.target in _ROW_SELECTIONS and unchanged and any(e > 0 and e in shape for e in extras)


def check_token_local(original: fx.GraphModule, rewritten: fx.GraphModule, region: TokenRegion,
                      num_selected: int, world: int = 1) -> dict[str, list[int]]:
    """Returns, for each region node, the extra rows of its token axes (``_token_dims``; empty when it
    carries no tokens), for ``token_rows``. With ``world`` > 1 ranks (context parallelism) an axis may also
    hold every rank's tokens (after an all-to-all), and a flat one several values per token (sent by one)."""
    tokens = region.num_tokens
    before = {n.name: example_value(n) for n in original.graph.nodes}
    carries: dict[str, list[int]] = {}
    for node in rewritten.graph.nodes:
        if node.name not in region.nodes:
            carries[node.name] = [0] if node.name.startswith(GATHER_PREFIX) else []
            continue
        extras = {e for arg in node.all_input_nodes for e in carries.get(arg.name, [])}
        reads_tokens = any(carries.get(arg.name) for arg in node.all_input_nodes)
        value, old = node.meta.get("val"), before.get(node.name)
        if not isinstance(value, torch.Tensor) or not isinstance(old, torch.Tensor):
            carries[node.name] = sorted(extras)  # tuples (chunk, unbind, split): their items decide
            continue
        old_shape, new_shape = tuple(old.shape), tuple(value.shape)
        carries[node.name] = _token_dims(old_shape, new_shape, tokens, num_selected, world)
        if (reads_tokens and not carries[node.name]
                and not _selects_extra_rows(node, old_shape, old_shape == new_shape, extras)):
            raise RewriteRefused(
                f"{describe(node)} is not token-local: its output {list(old_shape)} loses the token axis, "
                "so the blocks cannot run on a subset of tokens (partial steps off; full and reuse steps still run)"
            )
    return carries


def token_rows(graph: fx.Graph, operand: fx.Node, carries: dict[str, list[int]], tokens: int) -> tuple[int, int]:
    """``(offset, extra)``: where the ``tokens`` token rows of attention ``operand`` (``[..., L, D]``)
    start along L, and how many other rows it has (text joined to the sequence). Follows the operand
    back to the ``cat`` that joined the token rows to the others; ``carries`` is ``check_token_local``'s."""
    extra = (tensor_shape(operand) or (0, 0))[-2] - tokens
    node = operand
    while extra > 0 and node is not None:
        if node.target in (torch.cat, torch.concat):
            parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            carrying = [i for i, part in enumerate(parts) if carries.get(part.name)]
            if len(carrying) == 1:
                return sum(tensor_shape(part)[dim] for part in parts[:carrying[0]]), extra
            break
        node = next((arg for arg in node.all_input_nodes if carries.get(arg.name)), None)
    if extra > 0:
        raise RewriteRefused(f"cannot tell where the {tokens} token rows lie among the {tokens + extra} rows of "
                             f"{describe(operand)} (no single concatenation of token and other rows found)")
    return 0, 0


def placeholder_examples(gm: fx.GraphModule, example_inputs: Sequence[object],
                         extra: dict[str, torch.Tensor]) -> list[object]:
    """``example_inputs`` followed by ``extra[name]`` for each placeholder a rewrite added."""
    names = [n.name for n in placeholders(gm.graph)]
    return list(example_inputs) + [extra[name] for name in names[len(example_inputs):]]
