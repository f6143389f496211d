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

from .attention import AttentionSite, attention_operand, find_attention_sites
from .errors import PassFailed, RewriteRefused
from .graph_utils import ancestors, is_state_placeholder, placeholders
from .probe import ModulationSignal, extract_probe, find_modulation
from .record import build_full_variant
from .reuse import RESIDUAL_INPUT, build_reuse_variant
from .token_region import TokenRegion, find_token_region

logger = logging.getLogger("hetcache_compile")


@dataclass(frozen=True)
class GraphAnalysis:
    """Everything the passes learned about one graph; names nodes, holds none."""

    user_inputs: tuple[str, ...]
    sites: tuple[AttentionSite, ...]
    region: TokenRegion
    modulation: ModulationSignal | None
    text_inputs: tuple[str, ...]

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
            f"  inputs: {', '.join(r.inputs[:12])}{' ...' if len(r.inputs) > 12 else ''}",
        ]
        if self.modulation is None:
            lines.append("timestep-embedding probe: none found (adaptive schedule unavailable)")
        else:
            m = self.modulation
            lines.append(f"timestep-embedding probe: '{m.node}' shape {list(m.shape)} from input '{m.timestep_input}'")
        lines.append(f"text inputs (branch keys): {', '.join(self.text_inputs) or 'none'}")
        return "\n".join(lines)


@dataclass
class Variants:
    """The graphs the runtime dispatches between (uncompiled; the backend compiles them)."""

    full: fx.GraphModule
    reuse: fx.GraphModule
    probe: fx.GraphModule | None


def _check_no_symbolic_inputs(example_inputs: Sequence[object]) -> None:
    for value in example_inputs:
        if isinstance(value, torch.SymInt | torch.SymFloat) or (
            isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
        ):
            raise RewriteRefused(
                "the graph has dynamic shapes; compile with dynamic=False so each resolution gets its own variants"
            )


def analyze(gm: fx.GraphModule, example_inputs: Sequence[object]) -> GraphAnalysis:
    """Run the analysis passes. Raises ``RewriteRefused`` with a one-line reason."""
    _check_no_symbolic_inputs(example_inputs)
    nodes = placeholders(gm.graph)
    if len(nodes) != len(example_inputs):
        raise RewriteRefused(f"graph has {len(nodes)} inputs but {len(example_inputs)} example inputs")
    user_inputs = {n.name for n, ex in zip(nodes, example_inputs) if not is_state_placeholder(n, ex)}

    sites = run_pass("attention", find_attention_sites, gm, user_inputs)
    if not any(site.kind == "self" for site in sites):
        raise RewriteRefused("no self-attention found in the graph")
    region = run_pass("token_region", find_token_region, gm)
    outside = [s for s in sites if s.node not in region.nodes]
    if outside:
        raise RewriteRefused(f"attention '{outside[0].module}' lies outside the block stack")
    modulation = run_pass("probe", find_modulation, gm, region, user_inputs)
    text_inputs = _text_inputs(gm, sites, user_inputs)
    return GraphAnalysis(
        user_inputs=tuple(sorted(user_inputs)),
        sites=tuple(sites),
        region=region,
        modulation=modulation,
        text_inputs=text_inputs,
    )


def _text_inputs(gm: fx.GraphModule, sites: Sequence[AttentionSite], user_inputs: set[str]) -> tuple[str, ...]:
    """User inputs feeding cross-attention keys: they tell CFG branches apart."""
    by_name = {n.name: n for n in gm.graph.nodes}
    keys = [attention_operand(by_name[s.node], 1, "key") for s in sites if s.kind == "cross"]
    found = {n.name for n in ancestors(keys) if n.op == "placeholder" and n.name in user_inputs}
    return tuple(n.name for n in placeholders(gm.graph) if n.name in found)


def build_variants(gm: fx.GraphModule, analysis: GraphAnalysis) -> Variants:
    """Build the full, reuse and probe graphs; ``gm`` is left unchanged."""
    expected = [n.name for n in placeholders(gm.graph)]
    full = run_pass("record", build_full_variant, gm, analysis.region, verify=(gm, expected))
    reuse = run_pass("reuse", build_reuse_variant, gm, analysis.region, verify=(gm, expected + [RESIDUAL_INPUT]))
    probe = None
    if analysis.modulation is not None:
        probe = run_pass("probe_graph", extract_probe, gm, analysis.modulation.node, verify=(gm, expected))
    return Variants(full=full, reuse=reuse, probe=probe)


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
