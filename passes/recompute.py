"""Recompute cached keys and values from each site's projection input instead of storing them.

A self-attention site computes its queries, keys and values from one tensor, the normed and
modulated block input ``x`` (``[B, N, dim]``: Wan's ``to_q(x)``, ``to_k(x)``, ``to_v(x)``, then
head split, q/k norm and RoPE). Storing ``x`` for the tokens outside S instead of their keys and
values halves the cache; the partial step recomputes the context's keys and values from it.

Contract:

- ``projection_source(graph, site, num_tokens)`` returns the nearest node that the site's query,
  key and value are all computed from, with the token axis at -2 and ``num_tokens`` rows; raises
  ``RewriteRefused`` if there is none.
- ``copy_projection(graph, source, operand, replacements, before)`` inserts, before ``before``, a
  copy of the nodes that carry tokens from ``source`` (or from a gathered token input) to
  ``operand`` (the key or the value), reading ``replacements[n]`` wherever the original read ``n``,
  and returns the copy of ``operand``. The copy must stay small (a projection, a norm, RoPE): a
  chain of more than ``MAX_CHAIN_NODES`` nodes, or one through an attention, is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from .attention import attention_operand
from .errors import RewriteRefused
from .graph_utils import ancestors, describe, mutated_argument, tensor_shape

MAX_CHAIN_NODES = 64


def projection_source(graph: fx.Graph, site: fx.Node, num_tokens: int) -> fx.Node:
    operands = [attention_operand(site, i, name) for i, name in enumerate(("query", "key", "value"))]
    common = set.intersection(*(ancestors([op], writes=True) for op in operands))
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(common, key=order.__getitem__, reverse=True):
        shape = tensor_shape(node)
        if node.op != "placeholder" and shape is not None and len(shape) >= 2 and shape[-2] == num_tokens:
            return node
    raise RewriteRefused(f"{describe(site)}: no tensor of {num_tokens} token rows that its queries, keys and "
                         "values are all computed from, so its keys and values cannot be recomputed")


def copy_projection(graph: fx.Graph, source: fx.Node, operand: fx.Node, replacements: dict[fx.Node, fx.Node],
                    before: fx.Node, is_token_input: Callable[[fx.Node], bool]) -> fx.Node:
    chain = _token_chain(graph, source, operand, is_token_input)
    env = dict(replacements)
    with graph.inserting_before(before):
        for node in chain:
            env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    return env[operand]


def _token_chain(graph: fx.Graph, source: fx.Node, operand: fx.Node,
                 is_token_input: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """Nodes between ``source``/token inputs and ``operand`` that carry tokens, in graph order."""
    carries: set[fx.Node] = set()
    for node in graph.nodes:  # forward: what reads a token-carrying value (stopping nowhere: filtered below)
        if node is source or is_token_input(node) or any(n in carries for n in node.all_input_nodes):
            carries.add(node)
    chain: set[fx.Node] = set()
    stack = [operand]
    while stack:
        node = stack.pop()
        if node in chain or node is source or is_token_input(node) or node not in carries:
            continue
        chain.add(node)
        if len(chain) > MAX_CHAIN_NODES or _is_attention(node):
            raise RewriteRefused(f"the keys of {describe(operand)} are not a short projection of one tensor "
                                 f"(more than {MAX_CHAIN_NODES} nodes, or an attention, on the way): not recomputed")
        stack.extend(node.all_input_nodes)
        stack.extend(user for user in node.users if mutated_argument(user) is node)  # RoPE's out[...] = ...
    return [node for node in graph.nodes if node in chain]


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product_attention" in str(node.target)
