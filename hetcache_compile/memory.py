"""Cache memory before anything is loaded: what hetcache would keep, per CFG branch and cache plan.

``cache_memory(model, inputs)`` traces ``model(**inputs)`` with Dynamo, builds the variants
exactly as the backend does under each cache plan, and prices the tensors a full step records,
from shapes and dtypes alone (fake tensors: no memory, no compute). Build the model and the
inputs on the ``meta`` device and nothing is allocated, so the 14B model at 720p can be priced
on a laptop (``benchmarks/memory.py`` does, for the Wan sizes). With ``cache_device="cpu"`` the
per-site caches live in host memory and the device holds two sites' worth of them at a time
(``offloaded_bytes_per_branch``).

The bytes of a branch are its peak: right after a record step every token's keys and values
are held; the first partial step keeps only the rows outside S (less, by the share of S).
Steps run one at a time and a record step frees the branch's old caches before it makes new
ones, so a run's cache peak is ``branches x bytes_per_branch``: 2 with sequential CFG (the
diffusers default), 1 with batched CFG or none.

>>> import torch
>>> from diffusers import WanVACETransformer3DModel
>>> with torch.device("meta"):
...     model = WanVACETransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
...         out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, vace_layers=[0],
...         vace_in_channels=12)
...     inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([999]),
...         encoder_hidden_states=torch.randn(1, 5, 16), control_hidden_states=torch.randn(1, 12, 3, 8, 8),
...         return_dict=False)
>>> plans = cache_memory(model, inputs)
>>> [p.plan for p in plans]  # doctest: +NORMALIZE_WHITESPACE
['as computed (float32)', 'as computed (float32), recomputed', 'bfloat16', 'bfloat16, recomputed',
 'float8_e4m3fn', 'float8_e4m3fn, recomputed']
>>> plans[0].key_value_bytes == 3 * 2 * 48 * 24 * 4  # 3 self-attention sites x (K, V) x 48 tokens x 24 x 4 bytes
True
>>> [round(p.key_value_bytes / plans[0].key_value_bytes, 3) for p in plans]  # float8: + a float32 scale a row
[1.0, 0.5, 0.5, 0.25, 0.333, 0.146]
>>> plans[0].bytes_per_branch - plans[0].offloaded_bytes_per_branch == plans[0].key_value_bytes // 3  # 2 of 3 sites
True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .budget import PLAN_ORDER, branch_peak_bytes, buildable_plans
from .config import CACHE_DTYPES, HetCacheConfig
from .families import family_of
from .passes import RewriteRefused, Variants, analyze, build_variants
from .passes.graph_utils import output_node, tensor_bytes

__all__ = ["CachePlanBytes", "cache_memory"]


@dataclass(frozen=True)
class CachePlanBytes:
    """What one branch keeps under one cache plan (bytes)."""

    plan: str
    cache_dtype: str | None  # the ``cache_dtype`` option that selects this plan
    recompute_kv: bool  # and its ``recompute_kv`` option
    bytes_per_branch: int  # the peak of one branch (``budget.branch_peak_bytes``)
    key_value_bytes: int  # of which the per-site caches (keys and values, or their input; scales included)
    offloaded_bytes_per_branch: int  # the device's peak with ``cache_device="cpu"`` (key_value_bytes on the host)
    num_tokens: int
    cached_sites: int

    def fits(self, budget: int, branches: int = 2) -> bool:
        return branches * self.bytes_per_branch <= budget


def cache_memory(model: torch.nn.Module, inputs: Mapping[str, object], options: Mapping[str, object] | None = None,
                 plans: Sequence[tuple[str | None, bool]] = PLAN_ORDER) -> list[CachePlanBytes]:
    """Price hetcache's caches for ``model(**inputs)`` under each plan, a ``(cache_dtype, recompute_kv)``
    pair (default: every plan ``max_cache_bytes`` chooses among, most accurate first; narrower types
    only where narrower than the model's). ``options`` are the backend's (``prune``,
    ``relevance_site``...). Raises ``RewriteRefused`` if the model has no partial steps to cache for."""
    config = HetCacheConfig.from_options(dict(options or {}, inner_backend="eager"))
    gm, example_inputs = _trace(model, inputs)
    analysis = analyze(gm, example_inputs, family_of(gm).hints)
    if analysis.partial_refused:
        raise RewriteRefused(f"no partial steps, so no key/value caches: {analysis.partial_refused}")
    num_outputs = len(output_node(gm.graph).args[0])

    def build(cache_dtype: str | None, recompute: bool) -> Variants:
        return build_variants(gm, analysis, example_inputs, relevance_site=config.relevance_site, prune=config.prune,
                              cache_dtype=CACHE_DTYPES.get(cache_dtype), recompute=recompute)

    rows, computed = [], None
    for cache_dtype, recompute, variants in buildable_plans(build, plans, example_inputs, num_outputs):
        if variants.partial is None:
            raise RewriteRefused(f"no partial steps, so no key/value caches: {variants.partial_refused}")
        if recompute and not variants.recompute:  # prune="attention": nothing to recompute from
            continue
        caches = variants.cache_values(example_inputs, num_outputs)
        computed = computed or caches[0].dtype
        name = (f"as computed ({str(computed).removeprefix('torch.')})" if cache_dtype is None else cache_dtype)
        peak = functools.partial(branch_peak_bytes, variants, example_inputs, num_outputs, config.reuse_order)
        rows.append(CachePlanBytes(name + (", recomputed" if recompute else ""), cache_dtype, recompute, peak(),
                                   tensor_bytes(caches), peak(offload=True),
                                   analysis.region.num_tokens, len(variants.cached_sites)))
    return rows


def _trace(model: torch.nn.Module, inputs: Mapping[str, object]) -> tuple[fx.GraphModule, list]:
    captured: list[tuple[fx.GraphModule, list]] = []

    def capture(gm: fx.GraphModule, example_inputs: list) -> object:
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=capture, dynamic=False)(**inputs)
    if not captured:
        raise RewriteRefused("Dynamo captured no graph from the model")
    return max(captured, key=lambda item: len(item[0].graph.nodes))  # the block stack's graph
