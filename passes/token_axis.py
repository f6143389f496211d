"""Token axis: which region inputs carry tokens, and proof that the region is token-local.

Contract:
- ``find_token_inputs(gm, region, user_inputs)`` returns ``{input name: token dim}`` for the
  region inputs that carry one row per token (the hidden stream, the control stream, the RoPE
  tables). Which inputs those are is decided from the graph's structure, never from sizes alone
  (a hidden size can equal the token count: Wan 1.3B at 256x256 x 21 frames has 1536 of each):
  a token input's values derive only from video inputs (5-D user inputs such as the latents and
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
from .token_region import TokenRegion

GATHER_PREFIX = "hetcache_gather"


def find_token_inputs(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str]) -> dict[str, int]:
    by_name = {n.name: n for n in gm.graph.nodes}
    video_inputs = {n.name for n in placeholders(gm.graph)
                    if n.name in user_inputs and len(tensor_shape(n) or ()) == 5}
    token_inputs = {}
    for name in region.inputs:
        node = by_name[name]
        shape = tensor_shape(node)
        if node.op == "placeholder" and name not in user_inputs or shape is None:
            continue  # parameters and buffers
        sources = {n.name for n in ancestors([node], values_only=True)
                   if n.op == "placeholder" and n.name in user_inputs}
        if not sources <= video_inputs:
            continue  # derived from the timestep or the text: no token axis, whatever its sizes
        dims = [i for i, size in enumerate(shape) if size == region.num_tokens]
        if dims:
            token_inputs[name] = dims[0]
    if region.stream_input not in token_inputs:
        raise RewriteRefused(f"the token stream entering {region.main_stack} has no axis of {region.num_tokens} "
                             "tokens derived from a 5-D video input")
    return token_inputs


@dataclass(frozen=True)
class TokenGrid:
    """How tokens tile the latent video: ``grid`` = (F', H', W') tokens of ``patch`` latent cells."""

    latent_input: str
    latent_shape: tuple[int, ...]
    grid: tuple[int, int, int]
    patch: tuple[int, int, int]


def find_token_grid(gm: fx.GraphModule, region: TokenRegion, user_inputs: set[str]) -> TokenGrid | None:
    """The 5-D latent input of the token stream and the patch grid it is cut into, if any."""
    stream = next(n for n in gm.graph.nodes if n.name == region.stream_input)
    found = ancestors([stream])
    latents = [n for n in found if n.op == "placeholder" and n.name in user_inputs
               and len(tensor_shape(n) or ()) == 5]
    grids = [n for n in found if n.op != "placeholder" and len(tensor_shape(n) or ()) == 5
             and math.prod(tensor_shape(n)[2:]) == region.num_tokens]
    if len(latents) != 1 or not grids:
        return None
    latent_shape = tensor_shape(latents[0])
    grid = tuple(tensor_shape(grids[0])[2:])
    if any(size % g for size, g in zip(latent_shape[2:], grid)):
        return None
    patch = tuple(size // g for size, g in zip(latent_shape[2:], grid))
    return TokenGrid(latent_input=latents[0].name, latent_shape=latent_shape, grid=grid, patch=patch)


def propagate_fake_shapes(gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
    """Fill ``node.meta['val']`` of ``gm`` by running it on fake copies of ``example_inputs``.

    Errors propagate (callers turn them into refusals); torch's own traceback log is silenced.
    """
    mode = static_fake_mode(scalars=reads_scalars(gm))
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with quiet_fake_tensor_errors():
        FakeTensorProp(gm, mode).propagate(*fakes)


def _token_dims(original: tuple[int, ...], new: tuple[int, ...], tokens: int, selected: int) -> set[int]:
    if len(original) != len(new):
        return set()
    return {i for i, (a, b) in enumerate(zip(original, new)) if a == tokens and b == selected}


def check_token_local(original: fx.GraphModule, rewritten: fx.GraphModule, region: TokenRegion,
                      num_selected: int) -> None:
    tokens = region.num_tokens
    before = {n.name: example_value(n) for n in original.graph.nodes}
    carries: dict[str, bool] = {}
    for node in rewritten.graph.nodes:
        if node.name not in region.nodes:
            carries[node.name] = node.name.startswith(GATHER_PREFIX)
            continue
        reads_tokens = any(carries.get(arg.name, False) for arg in node.all_input_nodes)
        value, old = node.meta.get("val"), before.get(node.name)
        if not isinstance(value, torch.Tensor) or not isinstance(old, torch.Tensor):
            carries[node.name] = reads_tokens  # tuples (chunk, unbind): their items decide
            continue
        old_shape, new_shape = tuple(old.shape), tuple(value.shape)
        carries[node.name] = bool(_token_dims(old_shape, new_shape, tokens, num_selected))
        if reads_tokens and not carries[node.name]:
            raise RewriteRefused(
                f"{describe(node)} is not token-local: its output {list(old_shape)} loses the token axis, "
                "so the blocks cannot run on a subset of tokens (partial steps off; full and reuse steps still run)"
            )


def placeholder_examples(gm: fx.GraphModule, example_inputs: Sequence[object],
                         extra: dict[str, torch.Tensor]) -> list[object]:
    """``example_inputs`` followed by ``extra[name]`` for each placeholder a rewrite added."""
    names = [n.name for n in placeholders(gm.graph)]
    return list(example_inputs) + [extra[name] for name in names[len(example_inputs):]]
