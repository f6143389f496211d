"""``max_cache_bytes``: which cache plan a graph gets, and whether a branch may record its caches.

Two decisions, both against the same limit:

- at compile time, ``choose_cache_plan`` picks the most accurate way to store the partial steps'
  keys and values whose caches, for ``budget_branches`` branches, fit the limit (as computed, then
  bfloat16, then float8: ``passes/cache_codec.py``; each recomputed from the keys' projection input
  where the graph allows it: ``passes/recompute.py``); the bytes come from the record graph's shapes;
- at every full step, ``CacheBudget.admits`` lets a branch record only if its caches fit beside
  the other branches', so the caches never exceed the limit, whatever the branches turn out to be.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .config import CACHE_DTYPES, HetCacheConfig
from .passes import Variants
from .passes.graph_utils import tensor_bytes
from .passes.variant_io import StepOutputs

logger = logging.getLogger("hetcache_compile")

AUTO_SHARE = 0.5  # max_cache_bytes="auto": this share of the device memory free at compile time
# the types an unset cache_dtype walks under a budget, most accurate first (float16 only when asked:
# its range is not the model's)
NARROWING = (None, "bfloat16", "float8_e4m3fn")
# every (cache_dtype, recompute_kv) plan, as memory.py prices them: each type stored, then recomputed
PLAN_ORDER = tuple((cache_dtype, recompute) for cache_dtype in NARROWING for recompute in (False, True))


def resolve_limit(option: int | str | None, example_inputs: Sequence[object]) -> int | None:
    """The byte limit ``max_cache_bytes`` stands for on the device of ``example_inputs``."""
    if option != "auto":
        return option
    devices = cuda_devices(example_inputs)
    if not devices:
        logger.info("hetcache: max_cache_bytes='auto' bounds CUDA memory only; no bound here")
        return None
    free = min(torch.cuda.mem_get_info(device)[0] for device in devices)
    return int(AUTO_SHARE * free)


def cuda_devices(example_inputs: Sequence[object]) -> set[torch.device]:
    """The CUDA devices the graph's inputs live on (none on a CPU machine)."""
    return {x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"}


@dataclass(frozen=True)
class CachePlan:
    """The chosen storage of the caches and what it costs a branch."""

    cache_dtype: str | None  # None: as the model computes them
    recompute: bool  # the caches hold the projection input; keys and values are recomputed
    bytes_per_branch: int | None  # None: not priced (no limit)
    limit: int | None
    branches: int
    fits: bool
    offload: bool = False  # the per-site caches live in host memory; the bytes are the device's

    @property
    def name(self) -> str:
        return ((self.cache_dtype or "as computed") + (", keys/values recomputed" if self.recompute else "")
                + (", in host memory" if self.offload else ""))

    def describe(self) -> str:
        text = f"cache plan: {self.name}"
        if self.bytes_per_branch is not None:
            text += f", {self.bytes_per_branch / 2**20:.1f} MiB a branch"
        if self.limit is not None:
            verdict = "fits" if self.fits else "does not fit (branches that cannot record skip partial steps)"
            text += f"; {self.branches} x that {verdict} max_cache_bytes={self.limit / 2**20:.1f} MiB"
        return text


def candidate_plans(config: HetCacheConfig) -> tuple[tuple[str | None, bool], ...]:
    """The ``(cache_dtype, recompute)`` plans the options leave open, preferred first: an unset
    ``cache_dtype`` walks ``NARROWING``; an unset ``recompute_kv`` recomputes (exact, half the bytes)
    before it stores. Set options are taken as they are."""
    dtypes = NARROWING if config.cache_dtype is None else (config.cache_dtype,)
    recomputes = (True, False) if config.recompute_kv is None else (config.recompute_kv,)
    return tuple((cache_dtype, recompute) for cache_dtype in dtypes for recompute in recomputes)


def choose_cache_plan(build: Callable[[str | None, bool], Variants], example_inputs: Sequence[object],
                      num_outputs: int, config: HetCacheConfig, limit: int | None) -> tuple[Variants, CachePlan | None]:
    """Build the variants under the first of ``candidate_plans`` the model can have whose caches fit
    ``limit`` (``build(cache_dtype, recompute)``); without a limit, the first the model can have.

    A recomputed plan the model cannot have (keys that are not a short projection of the tokens,
    context parallelism) falls back to storing keys and values when the options allow it; a stored
    plan is skipped where the same type recomputed was built (it only holds more). When no plan
    fits, the smallest is kept and the runtime's ``CacheBudget`` decides per branch. Returns
    ``(variants, plan)``; the plan is None when the variants have no partial steps (nothing to cache).
    """
    def plan_for(variants: Variants, cache_dtype: str | None) -> CachePlan:
        if limit is None:  # priced only when there is a limit to hold it to (fake propagation costs seconds)
            return CachePlan(cache_dtype, variants.recompute, None, None, config.budget_branches, True,
                             variants.offload)
        per_branch = branch_peak_bytes(variants, example_inputs, num_outputs, config.reuse_order)
        return CachePlan(cache_dtype, variants.recompute, per_branch, limit, config.budget_branches,
                         config.budget_branches * per_branch <= limit, variants.offload)

    chosen = None
    for cache_dtype, _recompute, variants in buildable_plans(build, candidate_plans(config), example_inputs,
                                                             num_outputs, skip_stored_if_recomputed=True):
        if variants.partial is None:
            return variants, None
        chosen = (variants, plan_for(variants, cache_dtype))
        if chosen[1].fits:
            break
    return chosen


def buildable_plans(build: Callable[[str | None, bool], Variants], plans: Sequence[tuple[str | None, bool]],
                    example_inputs: Sequence[object], num_outputs: int,
                    skip_stored_if_recomputed: bool = False) -> Iterator[tuple[str | None, bool, Variants]]:
    """``(cache_dtype, recompute, variants)`` for each of ``plans`` (``(cache_dtype, recompute)`` pairs) the
    model can have, in order: a type no narrower than the model's own is skipped, and so is recomputing
    where the keys are not a short projection (once refused, not tried again) if ``plans`` also store
    that type; with ``skip_stored_if_recomputed``, so is storing a type whose recomputed plan was built
    (it only holds more). Variants without partial steps end the walk."""
    computed_size, recompute_refused, recomputed = None, False, set()
    for cache_dtype, recompute in plans:
        skipped_store = not recompute and skip_stored_if_recomputed and cache_dtype in recomputed
        if not_narrower(cache_dtype, computed_size) or (recompute and recompute_refused) or skipped_store:
            continue
        variants = build(cache_dtype, recompute)
        if variants.partial is None and recompute and (cache_dtype, False) in plans:
            recompute_refused = True
            continue
        if variants.recompute:
            recomputed.add(cache_dtype)
        yield cache_dtype, recompute, variants
        if variants.partial is None:
            return
        computed_size = computed_size or variants.cache_values(example_inputs, num_outputs)[0].element_size()


def not_narrower(cache_dtype: str | None, computed_size: int | None) -> bool:
    """Whether storing as ``cache_dtype`` saves nothing over the model's own type (``computed_size`` bytes)."""
    return cache_dtype is not None and computed_size is not None and CACHE_DTYPES[cache_dtype].itemsize >= computed_size


def branch_peak_bytes(variants: Variants, example_inputs: Sequence[object], num_outputs: int,
                      reuse_order: int, offload: bool | None = None) -> int:
    """The most one branch holds on the device: what a record step keeps (every token's caches, the
    relevance query and key) and, with ``reuse_order=1``, the residual slope of the steps before it.
    Offloaded caches (``offload``, default ``variants.offload``) count as the two sites' worth a
    partial step has on the device at once."""
    values = variants.recorded_values(example_inputs, num_outputs)
    total = tensor_bytes(values) + (tensor_bytes(values[:1]) if reuse_order and values else 0)
    if variants.offload if offload is None else offload:
        caches = StepOutputs.of_record(values, 0).caches
        per_site = variants.caches_per_site
        largest = max(tensor_bytes(caches[i:i + per_site]) for i in range(0, len(caches), per_site))
        total += min(2, len(variants.cached_sites)) * largest - tensor_bytes(caches)
    return total


class CacheBudget:
    """Admits a record step when its caches (``recorded_bytes``, known from the graph before the
    first call) fit ``limit`` beside the caches the other branches hold. No limit admits all."""

    def __init__(self, limit: int | None, recorded_bytes: int):
        self.limit = limit
        self.recorded_bytes = recorded_bytes

    def admits(self, other_branches_bytes: Iterable[int], say: Callable[[str], None]) -> bool:
        if self.limit is None:
            return True
        if sum(other_branches_bytes) + self.recorded_bytes <= self.limit:
            return True
        say(f"partial-step caches of {self.recorded_bytes / 2**20:.1f} MiB a branch do not fit "
            f"max_cache_bytes={self.limit} beside the other branches' caches: a branch that cannot "
            "record takes full and reuse steps only")
        return False
