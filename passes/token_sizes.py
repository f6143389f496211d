"""Read token counts from tensors at run time instead of the constants Dynamo traced.

Contract: ``size_tokens_at_run_time(graph, region)`` rewrites, in place, the region's ops whose
arguments spell out a size the token count decides, so that the same graph runs on a subset of the
tokens (the partial variant's ``|S|`` rows). With static shapes Dynamo records
``x.reshape(*x.shape[:-1], -1, 2)`` as ``reshape(1, 2, 48, -1, 2)`` and
``x.split([text, x.size(1) - text], 1)`` as ``split([6, 48], 1)``; both would fail, or be wrong, on
fewer tokens. Rewritten:

- ``view``/``reshape`` to a shape that begins with the input's own leading sizes (at least one of
  them token-sized): those leading sizes come from the input (``reshape_keeping_leading``);
- ``split`` into sizes of which exactly one is the token count: that part gets what the others
  leave (``split_token_rows``).

Under context parallelism (``shards``: a ``ShardLayout``) also, in the order they meet:

- each all-to-all sends and receives equal parts of what it is given (``shards.all_to_all_equal``);
- the reshape of what an all-to-all received back to the shape the flat tensor sent had
  (``shards.reshape_as_sent``);
- a reshape that splits a token axis into (ranks, rows) (``shards.split_rows``).

All compute what the traced op computed on the traced shapes. Other ops that hard-code the token
count are left alone; the fake-tensor check of the partial variant then refuses them by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from .graph_utils import tensor_shape
from .shards import ShardLayout, all_to_all_equal, collective_name, reshape_as_sent, split_rows
from .token_region import TokenRegion

_RESHAPES = ("view", "reshape", torch.reshape)
_SPLITS = ("split", "split_with_sizes", torch.split)


def reshape_keeping_leading(tensor: torch.Tensor, shape: Sequence[int], leading: int) -> torch.Tensor:
    """``tensor.reshape(shape)`` with ``shape[:leading]`` taken from ``tensor.shape``."""
    return tensor.reshape(*tensor.shape[:leading], *shape[leading:])


def split_token_rows(tensor: torch.Tensor, sizes: Sequence[int], dim: int, token_part: int) -> tuple:
    """``tensor.split(sizes, dim)`` with ``sizes[token_part]`` (the token rows) taken from ``tensor``'s size."""
    sizes = list(sizes)
    sizes[token_part] = tensor.shape[dim] - (sum(sizes) - sizes[token_part])
    return torch.split(tensor, sizes, dim)


def size_tokens_at_run_time(graph: fx.Graph, region: TokenRegion, shards: ShardLayout | None = None) -> int:
    """Rewrite the region's token-sized reshapes and splits (and all-to-alls); returns how many were rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.name not in region.nodes or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if shards is not None and _rewrite_sharded(node, region.num_tokens, shards):
            rewritten += 1
        elif node.target in _RESHAPES:
            rewritten += _rewrite_reshape(node, region.num_tokens)
        elif node.target in _SPLITS:
            rewritten += _rewrite_split(node, region.num_tokens)
    return rewritten


def _rewrite_reshape(node: fx.Node, tokens: int) -> bool:
    source, shape = tensor_shape(node.args[0]), _reshape_sizes(node)
    if source is None or shape is None:
        return False
    leading = 0
    while leading < min(len(shape), len(source)) and shape[leading] == source[leading]:
        leading += 1
    if not any(size >= tokens for size in shape[:leading]):
        return False
    node.op, node.target = "call_function", reshape_keeping_leading
    node.args, node.kwargs = (node.args[0], tuple(shape), leading), {}
    return True


def _rewrite_split(node: fx.Node, tokens: int) -> bool:
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                   node.kwargs.get("split_size"))
    if not isinstance(sizes, list | tuple) or list(sizes).count(tokens) != 1:
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    node.op, node.target = "call_function", split_token_rows
    node.args, node.kwargs = (node.args[0], tuple(sizes), dim, list(sizes).index(tokens)), {}
    return True


def _rewrite_sharded(node: fx.Node, tokens: int, shards: ShardLayout) -> bool:
    if collective_name(node) == "all_to_all_single":
        node.target, node.args, node.kwargs = all_to_all_equal, (node.args[0], shards.world, shards.group), {}
        return True
    if node.target not in _RESHAPES:
        return False
    shape = _reshape_sizes(node)
    sent = _sent_through_all_to_all(node.args[0])
    if sent is not None and shape is not None and tuple(shape) == tensor_shape(sent):
        node.op, node.target, node.args, node.kwargs = "call_function", reshape_as_sent, (node.args[0], sent), {}
        return True
    source = tensor_shape(node.args[0])
    if source is None or shape is None or len(shape) != len(source) + 1:
        return False
    for dim, size in enumerate(source):
        if (size in (tokens, tokens * shards.world) and tuple(shape[:dim]) == source[:dim]
                and tuple(shape[dim + 2:]) == source[dim + 1:] and shape[dim] == shards.world
                and shape[dim] * shape[dim + 1] == size):
            node.op, node.target, node.args, node.kwargs = "call_function", split_rows, (
                node.args[0], dim, shards.world), {}
            return True
    return False


def _reshape_sizes(node: fx.Node) -> tuple[int, ...] | None:
    shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
    return tuple(shape) if shape and all(isinstance(size, int) for size in shape) else None


def _sent_through_all_to_all(received: fx.Node) -> fx.Node | None:
    """The tensor that was flattened and sent, when ``received`` is the result of an all-to-all."""
    if collective_name(received) == "wait_tensor":
        received = received.args[0]
    if received.target is not all_to_all_equal and collective_name(received) != "all_to_all_single":
        return None
    flat = received.args[0]
    if isinstance(flat, fx.Node) and flat.target in ("flatten", torch.flatten) and len(flat.args) == 1:
        return flat.args[0]
    return None
