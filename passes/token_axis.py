"""Token axis: which region inputs carry tokens, and proof that the region is token-local.

Contract:
- ``find_token_inputs(gm, region, state_inputs)`` returns ``{input name: token dim}`` for the
  region inputs that carry one row per token (the hidden stream, the control stream, the RoPE
  tables): non-parameter tensors with a dimension of size ``region.num_tokens``. Where several
  dimensions have that size (a head dim equal to the token count) the first one is the token
  axis, as in every DiT layout ``[B, N, ...]``; the fake-tensor check below catches a wrong pick.
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
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import RewriteRefused
from .graph_utils import ancestors, example_value, placeholders, tensor_shape
from .token_region import TokenRegion

GATHER_PREFIX = "hetcache_gather"


def find_token_inputs(gm: fx.GraphModule, region: TokenRegion, state_inputs: set[str]) -> dict[str, int]:
    by_name = {n.name: n for n in gm.graph.nodes}
    token_inputs = {}
    for name in region.inputs:
        shape = tensor_shape(by_name[name])
        if name in state_inputs or shape is None:
            continue
        dims = [i for i, size in enumerate(shape) if size == region.num_tokens]
        if dims:
            token_inputs[name] = dims[0]
    if region.stream_input not in token_inputs:
        raise RewriteRefused(f"the token stream '{region.stream_input}' has no axis of {region.num_tokens} tokens")
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
    """Fill ``node.meta['val']`` of ``gm`` by running it on fake copies of ``example_inputs``."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
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
                f"'{node.name}' ({getattr(node.target, '__name__', node.target)}) is not token-local: "
                f"its output {list(old_shape)} loses the token axis"
            )


def placeholder_examples(gm: fx.GraphModule, example_inputs: Sequence[object],
                         extra: dict[str, torch.Tensor]) -> list[object]:
    """``example_inputs`` followed by ``extra[name]`` for each placeholder a rewrite added."""
    names = [n.name for n in placeholders(gm.graph)]
    return list(example_inputs) + [extra[name] for name in names[len(example_inputs):]]
