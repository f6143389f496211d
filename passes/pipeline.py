"""The pass manager: analyse a Dynamo graph, then build the variants, verifying after each pass.

``analyze(gm, example_inputs)`` returns a ``GraphAnalysis`` or raises ``RewriteRefused``.
``build_variants(gm, analysis)`` returns the rewritten graphs. Every pass runs under
``run_pass``, which checks the result (``graph.lint()``, the input left untouched, the
placeholder contract) and names the failing pass in a ``PassFailed`` error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import AttentionSite, attention_operand, find_attention_sites, with_ring_sites
from .cache_codec import CacheCodec
from .errors import PassFailed, RewriteRefused
from .graph_utils import (
    ancestors,
    example_value,
    is_state_placeholder,
    is_state_placeholder_name,
    output_node,
    placeholders,
)
from .hints import GraphHints
from .partial import build_attention_partial_variant, build_partial_variant
from .probe import ModulationSignal, extract_probe, find_modulation, find_timestep_input
from .recompute import projection_source
from .record import build_full_variant
from .reuse import build_reuse_variant
from .shards import ShardLayout, find_shards
from .token_axis import (
    TokenGrid,
    check_token_local,
    token_rows,
    find_token_grid,
    find_token_inputs,
    placeholder_examples,
    propagate_fake_shapes,
)
from .token_region import TokenRegion, find_token_region
from .variant_io import RESIDUAL_INPUT, StepOutputs, partial_input_names

logger = logging.getLogger("hetcache_compile")


@dataclass(frozen=True)
class GraphAnalysis:
    """Everything the passes learned about one graph; names nodes, holds none."""

    user_inputs: tuple[str, ...]
    sites: tuple[AttentionSite, ...]
    region: TokenRegion
    modulation: ModulationSignal | None
    timestep_input: str | None  # the diffusion timestep: runs are told apart by it going up
    text_inputs: tuple[str, ...]
    token_inputs: dict[str, int]  # region input -> token dim; empty when partial steps are refused
    token_grid: TokenGrid | None = None
    partial_refused: str | None = None
    shards: ShardLayout | None = None  # context parallelism: the region runs on one rank's shard of the tokens

    @property
    def self_sites(self) -> tuple[AttentionSite, ...]:
        return tuple(s for s in self.sites if s.kind == "self")

    def resolve_site(self, selector: int | str) -> AttentionSite:
        """A self-attention site by index among self-attention sites, or by module path."""
        sites = self.self_sites
        if isinstance(selector, int):
            if not -len(sites) <= selector < len(sites):
                raise ValueError(f"relevance_site {selector} out of range: there are {len(sites)} "
                                 "self-attention sites")
            return sites[selector]
        for site in sites:
            if site.module == selector:
                return site
        raise ValueError(f"relevance_site {selector!r} is not a self-attention module; "
                         f"choose one of {[s.module for s in sites]}")

    def report(self) -> str:
        """Human-readable summary, used by ``hetcache_compile.explain``."""
        r = self.region
        self_sites = [s for s in self.sites if s.kind == "self"]
        cross_sites = [s for s in self.sites if s.kind == "cross"]
        lines = [
            f"attention sites: {len(self.sites)} ({len(self_sites)} self, {len(cross_sites)} cross)",
        ]
        for site in self.sites:
            lines.append(f"  {site.module:<28} {site.kind:<5} q={site.num_queries} k={site.num_keys}")
        stacks = ", ".join(f"{name} x{count}" for name, count in r.stacks)
        lines += [
            f"token region: {stacks}; main stack '{r.main_stack}'; {r.num_tokens} tokens; "
            f"{len(r.nodes)} nodes",
            f"  enters at '{r.entry}', token stream '{r.stream_input}', leaves at '{r.exit}' "
            f"shape {list(r.exit_shape)}",
            f"  activations entering it: {', '.join(self._activation_inputs())}",
        ]
        if self.shards is not None:
            lines.append(f"context parallelism: {self.shards.scheme.capitalize()} over {self.shards.world} ranks "
                         f"(process group {self.shards.group!r}); the stack runs on this rank's {r.num_tokens} of "
                         f"{r.num_tokens * self.shards.world} tokens")
        lines.append(f"timestep input: {self.timestep_input or 'none found (no runs of steps: nothing is reused)'}")
        if self.modulation is None:
            lines.append("timestep-embedding probe: none found (adaptive schedule unavailable)")
        else:
            m = self.modulation
            lines.append(f"timestep-embedding probe: '{m.node}' shape {list(m.shape)} from input '{m.timestep_input}'")
        lines.append(f"text inputs (branch keys): {', '.join(self.text_inputs) or 'none'}")
        if self.partial_refused:
            lines.append(f"partial steps: refused ({self.partial_refused})")
        else:
            axes = ", ".join(f"{name}[dim {dim}]" for name, dim in self.token_inputs.items())
            g = self.token_grid
            where = (f"packed latents '{g.latent_input}' (mask: a token grid of {g.num_tokens} from set_mask)"
                     if g.packed else f"token grid {list(g.grid)} of patch {list(g.patch)} over '{g.latent_input}'")
            lines.append(f"partial steps: {where}; token inputs {axes}")
        return "\n".join(lines)

    def _activation_inputs(self) -> list[str]:
        """Region inputs other than parameters and buffers."""
        return [name for name in self.region.inputs if not is_state_placeholder_name(name)]


@dataclass
class Variants:
    """The graphs the runtime dispatches between (uncompiled; the backend compiles them)."""

    full: fx.GraphModule  # outputs the residual only
    record: fx.GraphModule | None  # full step that also records the partial steps' caches
    reuse: fx.GraphModule
    probe: fx.GraphModule | None
    partial: fx.GraphModule | None
    partial_refused: str | None
    cached_sites: tuple[str, ...]  # self-attention nodes whose caches the variants exchange
    relevance_site: AttentionSite | None
    prune: str = "block"
    codec: CacheCodec = CacheCodec()
    recompute: bool = False  # the caches hold the projection input, not keys and values
    offload: bool = False  # the per-site caches live in host memory (``offload.py``)

    @property
    def caches_per_site(self) -> int:
        """Cache tensors per site: keys and values (block) or their projection input (``recompute``),
        each as ``codec`` stores it, or the attention output (attention)."""
        if self.prune == "attention":
            return 1
        return (1 if self.recompute else 2) * self.codec.tensors_per_cache

    def recorded_values(self, example_inputs: Sequence[object], num_outputs: int) -> list[torch.Tensor]:
        """Fake values of what a record step keeps beyond the model's ``num_outputs`` outputs, for inputs
        shaped like ``example_inputs``: residual, final hidden states, the per-site caches (as stored),
        relevance query and key. Empty without a record variant. No memory, no compute; the fake
        propagation (seconds on a large model) runs once per input shapes."""
        if self.record is None:
            return []
        key = (num_outputs, *(_shape_key(value) for value in example_inputs))
        cached = self.__dict__.setdefault("_recorded_values", {})
        if key not in cached:
            propagate_fake_shapes(self.record, example_inputs)
            outputs = output_node(self.record.graph).args[0]
            values = [node.meta["val"] for node in outputs[num_outputs:]]
            cached[key] = [value for value in values if isinstance(value, torch.Tensor)]
        return cached[key]

    def cache_values(self, example_inputs: Sequence[object], num_outputs: int) -> list[torch.Tensor]:
        """The per-site caches among ``recorded_values`` (keys and values, scales included)."""
        return list(StepOutputs.of_record(self.recorded_values(example_inputs, num_outputs), 0).caches)


def _shape_key(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device
    return type(value)


def _check_no_symbolic_inputs(example_inputs: Sequence[object]) -> None:
    for value in example_inputs:
        if isinstance(value, torch.SymInt | torch.SymFloat) or (
            isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
        ):
            raise RewriteRefused(
                "the graph has dynamic shapes; compile with dynamic=False so each resolution gets its own variants"
            )


def analyze(gm: fx.GraphModule, example_inputs: Sequence[object], hints: GraphHints = GraphHints()) -> GraphAnalysis:
    """Run the analysis passes. Raises ``RewriteRefused`` with a one-line reason. ``hints`` classify the
    inputs the graph's structure cannot (``hints.py``; the model family's)."""
    _check_no_symbolic_inputs(example_inputs)
    nodes = placeholders(gm.graph)
    if len(nodes) != len(example_inputs):
        raise RewriteRefused(f"graph has {len(nodes)} inputs but {len(example_inputs)} example inputs")
    user_inputs = {n.name for n, ex in zip(nodes, example_inputs) if not is_state_placeholder(n, ex)}

    sites = run_pass("attention", find_attention_sites, gm, user_inputs)
    if not any(site.kind == "self" for site in sites):
        raise RewriteRefused("no self-attention found in the graph (scaled_dot_product_attention whose keys come "
                             "from the inputs its queries come from); hetcache rewrites transformer block stacks")
    region = run_pass("token_region", find_token_region, gm, user_inputs, [site.block for site in sites])
    shards = run_pass("shards", find_shards, gm, region)
    if shards is not None and shards.scheme == "ring":
        sites = run_pass("ring_sites", with_ring_sites, gm, sites, shards.world)
    outside = [s for s in sites if s.node not in region.nodes]
    if outside:
        raise RewriteRefused(f"attention '{outside[0].module}' lies outside the block stack")
    timestep_input = run_pass("timestep", find_timestep_input, gm, user_inputs, region.stream_sources)
    modulation = run_pass("probe", find_modulation, gm, region, user_inputs, timestep_input)
    text_inputs = _text_inputs(gm, sites, user_inputs, region, timestep_input, hints)
    token_inputs, partial_refused = {}, None
    token_grid = run_pass("token_grid", find_token_grid, gm, region, user_inputs, hints,
                          shards.world if shards else 1)
    try:
        token_inputs = run_pass("token_axis", find_token_inputs, gm, region, user_inputs, hints)
        if token_grid is None:
            raise RewriteRefused("no 5-D latent video input cut into a patch grid: the mask cannot be placed")
    except RewriteRefused as refused:
        partial_refused = str(refused)
    return GraphAnalysis(
        user_inputs=tuple(sorted(user_inputs)),
        sites=tuple(sites),
        region=region,
        modulation=modulation,
        timestep_input=timestep_input,
        text_inputs=text_inputs,
        token_inputs=token_inputs,
        token_grid=token_grid,
        partial_refused=partial_refused,
        shards=shards,
    )


def _text_inputs(gm: fx.GraphModule, sites: Sequence[AttentionSite], user_inputs: set[str], region: TokenRegion,
                 timestep_input: str | None, hints: GraphHints) -> tuple[str, ...]:
    """User inputs that tell CFG branches apart: those feeding cross-attention keys or, in models
    whose text joins the self-attention (SD3, Flux), every floating input of at most 3 dims that is
    neither the timestep nor a source of the token stream (prompt and pooled embeddings); and those
    ``hints`` name as text."""
    hinted = {name for name in user_inputs if hints.is_text(name)}
    by_name = {n.name: n for n in gm.graph.nodes}
    keys = [attention_operand(by_name[s.node], 1, "key") for s in sites if s.kind == "cross"]
    if keys:
        found = {n.name for n in ancestors(keys) if n.op == "placeholder" and n.name in user_inputs}
    else:
        found = {n.name for n in placeholders(gm.graph)
                 if n.name in user_inputs and n.name not in region.stream_sources and n.name != timestep_input
                 and isinstance(example_value(n), torch.Tensor) and example_value(n).is_floating_point()
                 and example_value(n).dim() <= 3 and hints.token_table_dim(n.name) is None}
    return tuple(n.name for n in placeholders(gm.graph) if n.name in found | hinted)


def build_variants(gm: fx.GraphModule, analysis: GraphAnalysis, example_inputs: Sequence[object],
                   relevance_site: int | str = -1, partial: bool = True, prune: str = "block",
                   cache_dtype: torch.dtype | None = None, recompute: bool = False,
                   offload: bool = False) -> Variants:
    """Build the full, reuse, probe and (if the region allows it) partial graphs; ``gm`` is unchanged.

    ``cache_dtype`` stores the partial steps' caches in that type (``CacheCodec``); ``recompute``
    caches each site's projection input and recomputes keys and values from it (``recompute.py``);
    ``offload`` keeps the per-site caches in host memory (``offload.py``).

    A region that is not token-local keeps full and reuse steps and records why partial
    steps were refused in ``Variants.partial_refused``.
    """
    expected = [n.name for n in placeholders(gm.graph)]
    region = analysis.region
    codec = CacheCodec(cache_dtype if prune == "block" else None)
    refused = analysis.partial_refused if partial else "disabled by the options"
    # self-attention over the tokens; a text-only one (HunyuanVideo's prompt refiner) runs in full
    sites = tuple(s.node for s in analysis.self_sites if s.num_queries >= region.num_tokens) if refused is None else ()
    relevance = analysis.resolve_site(relevance_site) if refused is None else None
    full = run_pass("full", build_full_variant, gm, region, verify=(gm, expected))
    record = None
    reuse = run_pass("reuse", build_reuse_variant, gm, region, verify=(gm, expected + [RESIDUAL_INPUT]))
    probe = None
    if analysis.modulation is not None:
        probe = run_pass("probe_graph", extract_probe, gm, analysis.modulation.node, verify=(gm, expected))
    partial_gm = None
    if refused is None:
        try:
            recompute, offload = recompute and prune == "block", offload and prune == "block"
            partial_gm = run_pass("partial", _build_checked_partial, gm, analysis, example_inputs, sites, prune,
                                  codec, recompute, offload,
                                  verify=(gm, expected + partial_input_names(len(sites), prune, codec, recompute)))
            record = run_pass("record", build_full_variant, gm, region, sites, relevance.node, prune, codec,
                              recompute, offload, partial_gm.meta.get(TOKEN_ROWS, {}), verify=(gm, expected))
        except RewriteRefused as error:
            refused = str(error)
            sites, relevance = (), None
    return Variants(full=full, record=record, reuse=reuse, probe=probe, partial=partial_gm, partial_refused=refused,
                    cached_sites=sites, relevance_site=relevance, prune=prune, codec=codec,
                    recompute=recompute and partial_gm is not None and prune == "block",
                    offload=offload and partial_gm is not None and prune == "block")


def _build_checked_partial(gm: fx.GraphModule, analysis: GraphAnalysis, example_inputs: Sequence[object],
                           sites: Sequence[str], prune: str, codec: CacheCodec,
                           recompute: bool = False, offload: bool = False) -> fx.GraphModule:
    """Build the partial variant and prove on fake tensors that it is token-local."""
    by_name = {n.name: n for n in gm.graph.nodes}
    tokens = analysis.region.num_tokens
    selected = max(1, tokens - 1)
    ring = analysis.shards is not None and analysis.shards.scheme == "ring"
    ranks_at_attention = analysis.shards.world if analysis.shards and not ring else 1  # Ulysses: every rank's rows
    if analysis.shards and (recompute or prune == "attention" or (ring and offload)):
        raise RewriteRefused("under context parallelism partial steps store keys and values on the device "
                             "(prune='block', recompute_kv=False; Ring: cache_device as the model's)")
    if recompute and any(site.num_queries > tokens for site in analysis.self_sites if site.node in sites):
        raise RewriteRefused(_JOINED_KEYS)  # known before the fake-tensor proof; the proof below checks it too
    exit_value = by_name[analysis.region.exit].meta["example_value"]
    extra = {
        "hetcache_index": torch.arange(selected, device=exit_value.device),
        "hetcache_exit_cache": _empty_like_meta(by_name[analysis.region.exit]),
    }
    if recompute:
        extra["hetcache_context_index"] = torch.arange(tokens - selected, device=exit_value.device)
    for j, name in enumerate(sites):
        site = by_name[name]
        if recompute:
            projected = projection_source(gm.graph, site, tokens).meta["example_value"]
            extra.update(zip(codec.names(f"hetcache_x{j}"), codec.empty_like(projected, tokens - selected)))
        for operand, (position, keyword) in (("k", (1, "key")), ("v", (2, "value"))):
            value = attention_operand(site, position, keyword).meta["example_value"]
            value = value.transpose(1, 2) if ring else value  # cached as [B, H, n, D]
            names = codec.names(f"hetcache_{operand}{j}")
            extra.update(zip(names, codec.empty_like(value, ranks_at_attention * (tokens - selected))))
        extra[f"hetcache_a{j}"] = _empty_like_meta(site)
    if prune == "attention":
        joined = [site for site in analysis.self_sites if site.num_queries != tokens]
        if joined:
            raise RewriteRefused(f"prune='attention' caches attention outputs of {tokens} token rows, but "
                                 f"'{joined[0].module}' attends over {joined[0].num_queries} rows (text joined to the "
                                 "tokens); use prune='block'")
        partial = build_attention_partial_variant(gm, analysis.region, sites)
        propagate_fake_shapes(partial, placeholder_examples(partial, example_inputs, extra))
        return partial  # only attention queries shrink: nothing else can mix tokens
    partial = build_partial_variant(gm, analysis.region, analysis.token_inputs, sites, codec, recompute, offload,
                                    shards=analysis.shards)
    try:
        propagate_fake_shapes(partial, placeholder_examples(partial, example_inputs, extra))
    except Exception as error:  # noqa: BLE001 - a shape error here means a hard-coded token count
        raise RewriteRefused(f"the block stack does not run on a subset of tokens: {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200]}") from error
    carries = check_token_local(gm, partial, analysis.region, selected, ranks_at_attention)
    partial.meta[TOKEN_ROWS] = rows = {}
    for name in sites:
        for position, keyword in ((0, "query"), (1, "key")):
            operand = attention_operand(by_name[name], position, keyword)
            rows[operand.name] = (0, 0) if ring else token_rows(gm.graph, operand, carries, tokens * ranks_at_attention)
    masked = {name: rows[attention_operand(by_name[name], 1, "key").name][0] for name in sites
              if attention_operand(by_name[name], 3, "attn_mask") is not None}
    if any(masked.values()):  # text rows before the tokens under a key-padding mask: cached rows go after them
        partial = build_partial_variant(gm, analysis.region, analysis.token_inputs, sites, codec, recompute, offload,
                                        key_offsets=masked, shards=analysis.shards)
        propagate_fake_shapes(partial, placeholder_examples(partial, example_inputs, extra))
        check_token_local(gm, partial, analysis.region, selected, ranks_at_attention)
        partial.meta[TOKEN_ROWS] = rows
    if recompute and any(extra for _offset, extra in rows.values()):
        raise RewriteRefused(_JOINED_KEYS)
    return partial


_JOINED_KEYS = ("recompute_kv: the keys attend over text rows joined to the tokens, which a projection of the "
                "token rows alone cannot recompute")


TOKEN_ROWS = "hetcache_token_rows"  # partial.meta: attention operand name -> (offset, extra) of its token rows


def _empty_like_meta(node: fx.Node) -> torch.Tensor:
    """An empty tensor like ``node``'s value (the output's, for an attention op that also returns its log-sum-exp)."""
    value = node.meta["example_value"]
    value = value[0] if isinstance(value, tuple | list) else value
    return torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)


def run_pass(name: str, fn: Callable, *args, verify: tuple[fx.GraphModule, list[str]] | None = None):
    """Run one pass; turn crashes and failed checks into ``PassFailed(name)``.

    ``RewriteRefused`` passes through untouched: refusing is a normal outcome, not a bug.
    With ``verify=(source, placeholder_names)`` the result must be a linted GraphModule with
    exactly those placeholders, and ``source`` must still lint (the pass did not mutate it).
    """
    before = len(verify[0].graph.nodes) if verify else None
    try:
        result = fn(*args)
        if verify is not None:
            source, names = verify
            result.graph.lint()
            got = [n.name for n in placeholders(result.graph)]
            if got != names:
                raise AssertionError(f"placeholders changed: expected {names[-3:]}..., got {got[-3:]}...")
            if len(source.graph.nodes) != before:
                raise AssertionError("the pass mutated its input graph")
    except RewriteRefused:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the pass named
        raise PassFailed(name, error) from error
    logger.debug("pass %s done", name)
    return result
