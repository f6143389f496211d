"""Build the *partial* variant: compute the selected tokens S, reuse cached rows for the rest.

Contract: ``build_partial_variant(gm, region, token_inputs, sites, codec=CacheCodec(),
recompute=False, offload=False)`` returns a new GraphModule whose placeholders are ``gm``'s followed
by ``hetcache_index`` (int64 ``[|S|]``, sorted token indices), ``hetcache_exit_cache`` (the region
exit of the last computed step, all tokens) and ``hetcache_k{j}``, ``hetcache_v{j}`` for each
self-attention site j: the *context cache*, the keys/values of the last full step for the N - |S|
tokens outside S, in the layout attention reads them, in any order along the token axis, each stored
as ``codec`` says (float8: data ``hetcache_k{j}`` and scale ``hetcache_k{j}_scale``; decoded in the
graph). With ``recompute`` the context cache of site j is instead ``hetcache_x{j}``, the rows
outside S of the tensor its keys and values are projected from, in the order of
``hetcache_context_index`` (int64 ``[N - |S|]``, placed after the exit cache); the graph recomputes
their keys and values with the context's token inputs (RoPE) gathered at that index
(``recompute.py``). With ``offload`` the context caches are host tensors, each site's copied to the
device while the attention before it runs (``offload.py``). It:

1. gathers every token input of the region at S (``token_inputs``: name -> token dim) and reads
   the token count from the tensors where Dynamo hard-coded it (``token_sizes.py``);
2. runs the region on |S| tokens; at each self-attention site the keys and values are the
   context cache followed by the fresh keys/values of S (``cat``), queries are S only. Where text
   rows share the attention's sequence (CogVideoX), they are fresh rows too: computed every step,
   never cached;
3. scatters the region exit into the cached exit and runs the epilogue on all tokens.

Under context parallelism (``shards``, Ulysses) the region runs on this rank's shard: ``hetcache_index``
selects this rank's rows of S (every rank as many), the all-to-alls carry |S| rows, and the context caches
hold this rank's heads of every rank's context tokens (attention's layout after the all-to-all). Under
Ring the context caches hold this rank's own context rows, all heads (``[B, H, n - k, D]``), joined to the
fresh rows before the gather of keys and values, so every shape after the gather is the full step's.

Attention without a mask does not depend on the order of its keys, so appending the fresh rows
gives the same result as writing them back in place, and a partial step never rewrites an
N-row cache (an ``index_copy`` per site cost more than the attention it saved on CPU). Sites with
an attention mask or ``is_causal`` are refused. The context caches do not change between full
steps, so they are inputs only.

Outputs: ``gm``'s outputs, then the stack residual and the new exit cache. With S = all tokens
(empty context caches) it computes exactly what ``gm`` computes. ``gm`` is not modified.

``build_attention_partial_variant(gm, region, sites)`` is the ``prune="attention"`` form (the
paper's code): every op runs on all tokens except self-attention, whose queries are S only;
the attention output of the other tokens comes from the per-site cache ``hetcache_a{j}``.
Placeholders: ``gm``'s, ``hetcache_index``, ``hetcache_a0, hetcache_a1, ...``; outputs:
``gm``'s, residual, exit, ``a0, a1, ...``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx

from .attention import attention_operand
from .cache_codec import CacheCodec
from .errors import RewriteRefused
from .graph_utils import (
    copy_graph_module,
    example_value,
    finalize,
    insert_residual,
    output_node,
    placeholders,
    prune_dead_nodes,
    tensor_shape,
)
from .offload import fetch
from .recompute import copy_projection, projection_source
from .shards import ShardLayout, is_ring_site
from .token_axis import GATHER_PREFIX
from .token_region import TokenRegion
from .token_sizes import size_tokens_at_run_time
from .variant_io import CONTEXT_INDEX_INPUT, EXIT_CACHE_INPUT, INDEX_INPUT, partial_input_names

def set_attention_operand(node: fx.Node, index: int, name: str, value: fx.Node) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def build_partial_variant(gm: fx.GraphModule, region: TokenRegion, token_inputs: dict[str, int],
                          sites: Sequence[str], codec: CacheCodec = CacheCodec(),
                          recompute: bool = False, offload: bool = False,
                          key_offsets: Mapping[str, int] = {}, shards: ShardLayout | None = None) -> fx.GraphModule:
    partial = copy_graph_module(gm)
    graph = partial.graph
    by_name = {n.name: n for n in graph.nodes}
    inputs = _add_placeholders(graph, partial_input_names(len(sites), codec=codec, recompute=recompute))
    index = inputs[INDEX_INPUT]

    at_context: dict[fx.Node, fx.Node] = {}  # each gathered token input -> the same input at the context rows
    for name, dim in token_inputs.items():
        source = by_name[name]
        # a token table the graph takes as an input is gathered after the added inputs (the index)
        with graph.inserting_after(placeholders(graph)[-1] if source.op == "placeholder" else source):
            gathered = graph.call_function(torch.index_select, (source, dim, index))
        gathered.name = f"{GATHER_PREFIX}_{name}"
        upstream = name not in region.inputs  # a graph input the prologue reads: gathered for the prologue too
        source.replace_all_uses_with(gathered, delete_user_cb=lambda user: upstream and user is not gathered
                                     or user.name in region.nodes)
        if recompute:
            with graph.inserting_after(gathered):
                at_context[gathered] = graph.call_function(torch.index_select,
                                                           (source, dim, inputs[CONTEXT_INDEX_INPUT]))

    size_tokens_at_run_time(graph, region, shards)
    site_nodes = [by_name[name] for name in sites]
    for j, site in enumerate(site_nodes):
        _refuse_masked_attention(site)
        ring = is_ring_site(site)
        stored = {base: [inputs[name] for name in codec.names(f"hetcache_{base}{j}")]
                  for base in (("x",) if recompute else ("k", "v"))}
        if offload:  # start the copy one attention early, on the side stream
            ahead = site_nodes[j - 1] if j else site
            copies = fetch(graph, [t for ts in stored.values() for t in ts], attention_operand(ahead, 0, "query"),
                           start_before=ahead, use_before=site)
            stored = {base: [copies.pop(0) for _ in ts] for base, ts in stored.items()}
        if recompute:
            projected = projection_source(graph, site, region.num_tokens)
            replacements = {projected: codec.decode(graph, stored["x"], example_value(projected).dtype, before=site),
                            **at_context}
        for operand, (position, keyword) in (("k", (1, "key")), ("v", (2, "value"))):
            fresh = attention_operand(site, position, keyword)
            dim = len(tensor_shape(fresh)) - 2
            if ring:  # join before the gather: every rank's chunk keeps its n rows
                anchor = fresh.next
                _join_ring_rows(graph, fresh, codec.decode(graph, stored[operand], example_value(fresh).dtype,
                                                           before=anchor), anchor)
                continue
            if recompute:
                cached = copy_projection(graph, projected, fresh, replacements, before=site,
                                         is_token_input=at_context.__contains__)
            else:
                cached = codec.decode(graph, stored[operand], example_value(fresh).dtype, before=site)
            with graph.inserting_before(site):
                offset = key_offsets.get(site.name, 0)
                if offset:  # the cached token rows go where the token rows were (a key-padding mask's layout)
                    head, tail = graph.call_function(torch.tensor_split, (fresh, [offset], dim)), None
                    head, tail = (graph.call_function(operator.getitem, (head, i)) for i in (0, 1))
                    keys = graph.call_function(torch.cat, ([head, cached, tail], dim))
                else:
                    keys = graph.call_function(torch.cat, ([cached, fresh], dim))
            set_attention_operand(site, position, keyword, keys)

    exit_node, stream = by_name[region.exit], by_name[region.stream_input]
    with graph.inserting_after(exit_node):
        exit_full = graph.call_function(torch.index_copy, (inputs[EXIT_CACHE_INPUT], 1, index, exit_node))
    exit_node.replace_all_uses_with(exit_full, delete_user_cb=lambda user: user is not exit_full
                                    and user.name not in region.nodes)
    residual = insert_residual(graph, exit_full, stream)

    output = output_node(graph)
    output.args = (tuple(output.args[0]) + (residual, exit_full),)
    prune_dead_nodes(graph)
    return finalize(partial)


def _join_ring_rows(graph: fx.Graph, fresh: fx.Node, cached: fx.Node, before: fx.Node) -> None:
    """Ring: this rank's cached context rows (``[B, H, n - k, D]``) and its k fresh rows (``[B, k, H, D]``) become
    the n rows every use of ``fresh`` reads: the gather of keys and values, the attention over this rank's own."""
    with graph.inserting_before(before):
        turned = graph.call_method("transpose", (fresh, 1, 2))
        joined = graph.call_function(torch.cat, ([cached, turned], 2))
        rows = graph.call_method("transpose", (joined, 1, 2))
    fresh.replace_all_uses_with(rows, delete_user_cb=lambda user: user is not turned)


def _refuse_masked_attention(site: fx.Node) -> None:
    """Cached keys join the fresh ones: the order of the token rows changes, so a mask must not depend on
    it. A key-padding mask (``[..., 1, L]``, for padded prompt rows: HunyuanVideo's, QwenImage's) is kept:
    it is the same for every query, and the cached rows are put where the token rows were
    (``key_offsets``, from the pass manager), so the prompt rows keep their place."""
    mask = attention_operand(site, 3, "attn_mask")
    padding_only = mask is None or (tensor_shape(mask) or (0, 0))[-2:-1] == (1,)
    if not padding_only or attention_operand(site, 5, "is_causal"):
        raise RewriteRefused(f"self-attention '{site.name}' has an attention mask over queries and keys or is "
                             "causal: the order of its keys matters, so cached keys cannot be reused for a subset "
                             "of tokens")


def build_attention_partial_variant(gm: fx.GraphModule, region: TokenRegion,
                                    sites: Sequence[str]) -> fx.GraphModule:
    partial = copy_graph_module(gm)
    graph = partial.graph
    by_name = {n.name: n for n in graph.nodes}
    inputs = _add_placeholders(graph, partial_input_names(len(sites), "attention"))
    index = inputs[INDEX_INPUT]
    fresh_caches = []
    for j, site_name in enumerate(sites):
        site = by_name[site_name]
        query = attention_operand(site, 0, "query")
        dim = len(tensor_shape(query)) - 2
        with graph.inserting_before(site):
            gathered = graph.call_function(torch.index_select, (query, dim, index))
        set_attention_operand(site, 0, "query", gathered)
        with graph.inserting_after(site):
            spliced = graph.call_function(torch.index_copy, (inputs[f"hetcache_a{j}"], dim, index, site))
        site.replace_all_uses_with(spliced, delete_user_cb=lambda user: user is not spliced)
        fresh_caches.append(spliced)
    exit_node, stream = by_name[region.exit], by_name[region.stream_input]
    residual = insert_residual(graph, exit_node, stream)
    output = output_node(graph)
    output.args = (tuple(output.args[0]) + (residual, exit_node, *fresh_caches),)
    return finalize(partial)


def _add_placeholders(graph: fx.Graph, names: Sequence[str]) -> dict[str, fx.Node]:
    added = {}
    anchor = placeholders(graph)[-1]
    for name in names:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        added[name] = anchor
    return added
