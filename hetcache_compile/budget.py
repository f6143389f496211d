"""``max_cache_bytes``: which cache plan a graph gets, and whether a branch may record its caches.

Two decisions, both against the same limit:

- at compile time, ``choose_cache_plan`` picks the most accurate way to store the partial steps'
  keys and values whose caches, for ``budget_branches`` branches, fit the limit (as computed, then
  bfloat16, then float8: ``passes/cache_codec.py``); the bytes come from the record graph's shapes;
- at every full step, ``CacheBudget.admits`` lets a branch record only if its caches fit beside
  the other branches', so the caches never exceed the limit, whatever the branches turn out to be.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .config import CACHE_DTYPES, HetCacheConfig
from .passes import Variants

logger = logging.getLogger("hetcache_compile")

AUTO_SHARE = 0.5  # max_cache_bytes="auto": this share of the device memory free at compile time
PLAN_ORDER = (None, "bfloat16", "float8_e4m3fn")  # most accurate first; float16 only when asked


def resolve_limit(option: int | str | None, example_inputs: Sequence[object]) -> int | None:
    """The byte limit ``max_cache_bytes`` stands for on the device of ``example_inputs``."""
    if option != "auto":
        return option
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"}
    if not devices:
        logger.info("hetcache: max_cache_bytes='auto' bounds CUDA memory only; no bound here")
        return None
    free = min(torch.cuda.mem_get_info(device)[0] for device in devices)
    return int(AUTO_SHARE * free)


@dataclass(frozen=True)
class CachePlan:
    """The chosen storage of the caches and what it costs a branch."""

    cache_dtype: str | None  # None: as the model computes them
    bytes_per_branch: int | None  # None: not priced (no limit)
    limit: int | None
    branches: int
    fits: bool

    def describe(self) -> str:
        text = f"cache plan: {self.cache_dtype or 'as computed'}"
        if self.bytes_per_branch is not None:
            text += f", {self.bytes_per_branch / 2**20:.1f} MiB a branch"
        if self.limit is not None:
            verdict = "fits" if self.fits else "does not fit (branches that cannot record skip partial steps)"
            text += f"; {self.branches} x that {verdict} max_cache_bytes={self.limit / 2**20:.1f} MiB"
        return text


def choose_cache_plan(build: Callable[[str | None], Variants], example_inputs: Sequence[object], num_outputs: int,
                      config: HetCacheConfig, limit: int | None) -> tuple[Variants, CachePlan | None]:
    """Build the variants under the most accurate plan that fits ``limit`` (``build(cache_dtype)``).

    An explicit ``config.cache_dtype``, or no limit, is taken as is. When no plan fits, the narrowest
    is kept and the runtime's ``CacheBudget`` decides per branch. Returns ``(variants, plan)``; the plan
    is None when the variants have no partial steps (nothing to cache).
    """
    fixed = config.cache_dtype is not None or limit is None
    candidates = [config.cache_dtype] if fixed else list(PLAN_ORDER)
    computed_size = None
    for position, cache_dtype in enumerate(candidates):
        if cache_dtype is not None and computed_size is not None and CACHE_DTYPES[cache_dtype].itemsize >= computed_size:
            continue  # no narrower than the model's own type
        variants = build(cache_dtype)
        if variants.partial is None:
            return variants, None
        if fixed:  # priced only when there is a limit to hold it to (fake propagation costs seconds)
            per_branch = None if limit is None else branch_peak_bytes(variants, example_inputs, num_outputs,
                                                                      config.reuse_order)
            fits = limit is None or per_branch <= limit
            return variants, CachePlan(cache_dtype, per_branch, limit, config.budget_branches, fits)
        per_branch = branch_peak_bytes(variants, example_inputs, num_outputs, config.reuse_order)
        computed_size = computed_size or variants.cache_values(example_inputs, num_outputs)[0].element_size()
        fits = config.budget_branches * per_branch <= limit
        if fits or position == len(candidates) - 1:
            return variants, CachePlan(cache_dtype, per_branch, limit, config.budget_branches, fits)
    raise AssertionError("unreachable: the last candidate always returns")


def branch_peak_bytes(variants: Variants, example_inputs: Sequence[object], num_outputs: int,
                      reuse_order: int) -> int:
    """The most one branch holds: what a record step keeps (every token's caches, the relevance query
    and key) and, with ``reuse_order=1``, the residual slope of the steps before it."""
    values = variants.recorded_values(example_inputs, num_outputs)
    total = sum(v.numel() * v.element_size() for v in values)
    return total + (values[0].numel() * values[0].element_size() if reuse_order and values else 0)


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
