"""Build the *full* variant: the original graph plus everything the runtime must remember.

Contract: ``build_full_variant(gm, region, sites=(), relevance_site=None, prune="block", codec=CacheCodec(),
recompute=False, offload=False)``
returns a new GraphModule with the same placeholders as ``gm``. Its outputs are ``gm``'s
outputs, then:

- the stack residual ``R = exit - stream_input`` (the total change the block stack, VACE
  branch included, made to the token stream; reuse steps add it back);
- the region exit (final hidden states of all tokens, the partial steps' scatter target);
- per self-attention site in ``sites``: with ``prune="block"`` its keys and values
  ``k0, v0, k1, v1, ...`` as the attention op reads them (after norm and RoPE; a ring site's as
  ``[B, H, n, D]``, this rank's rows; only the token
  rows, ``token_rows[key] = (offset, extra)``, where text rows share the sequence), each in
  ``codec``'s stored form (one tensor, or float8 data and its scale: ``cache_codec.py``); with
  ``recompute`` instead the tensor they are projected from, one per site (``recompute.py``); with
  ``prune="attention"`` its attention output ``a0, a1, ...``;
- if ``relevance_site`` is given, the queries and keys of that site (token rows only; for token selection).

With ``offload`` each site's stored caches are copied to the host right after its attention
(``offload.py``), and the outputs are those host copies.

``gm`` is not modified; every original node keeps its ``meta``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx

from .attention import attention_operand, in_cache_layout
from .cache_codec import CacheCodec
from .graph_utils import copy_graph_module, finalize, insert_residual, output_node
from .offload import offload as offload_to_host
from .recompute import projection_source
from .variant_io import record_outputs
from .token_region import TokenRegion


def build_full_variant(gm: fx.GraphModule, region: TokenRegion, sites: Sequence[str] = (),
                       relevance_site: str | None = None, prune: str = "block",
                       codec: CacheCodec = CacheCodec(), recompute: bool = False,
                       offload: bool = False, token_rows: Mapping[str, tuple[int, int]] = {}) -> fx.GraphModule:
    full = copy_graph_module(gm)
    by_name = {n.name: n for n in full.graph.nodes}
    exit_node, stream = by_name[region.exit], by_name[region.stream_input]
    residual = insert_residual(full.graph, exit_node, stream)
    residual.name = "hetcache_residual"

    output = output_node(full.graph)
    caches = []
    for name in sites:
        site = by_name[name]
        if prune == "attention":
            caches.append(site)
            continue
        # offloaded caches leave right after their last use, so the device never holds them all
        before = site.next if offload else output
        if recompute:
            cached = [projection_source(full.graph, site, region.num_tokens)]
        else:
            key, value = attention_operand(site, 1, "key"), attention_operand(site, 2, "value")
            cached = [_token_rows_of(full.graph, in_cache_layout(full.graph, site, t, before),
                                     token_rows.get(key.name), region.num_tokens, before) for t in (key, value)]
        stored = [t for operand in cached for t in codec.encode(full.graph, operand, before=before)]
        caches += offload_to_host(full.graph, stored, before=before) if offload else stored
    selection_inputs = []
    if relevance_site is not None:
        site = by_name[relevance_site]
        selection_inputs = [_token_rows_of(full.graph, in_cache_layout(full.graph, site, operand, output),
                                           token_rows.get(operand.name), region.num_tokens, output)
                            for operand in (attention_operand(site, 0, "query"), attention_operand(site, 1, "key"))]
    output.args = (tuple(output.args[0]) + record_outputs(residual, exit_node, caches, selection_inputs),)
    return finalize(full)


def _token_rows_of(graph: fx.Graph, operand: fx.Node, rows: tuple[int, int] | None, tokens: int,
                   before: fx.Node) -> fx.Node:
    """``operand`` (``[..., L, D]``) cut to its token rows where text rows share its sequence."""
    if not rows or not rows[1]:
        return operand
    with graph.inserting_before(before):
        return graph.call_function(torch.narrow, (operand, -2, rows[0], tokens))
