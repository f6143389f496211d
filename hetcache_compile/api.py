"""Public functions that take a model: ``set_mask``, ``stats``, ``reset``, ``explain``.

``model`` may be the module given to ``torch.compile``, the ``OptimizedModule`` it returned,
or a module compiled in place with ``module.compile(backend="hetcache")``. Runtimes are found
through the model's parameters, which Dynamo passes to every compiled graph.
"""

from __future__ import annotations

import torch

from .priors import USER_MASKS, mask_to_token_grid
from .runtime import LIVE_RUNTIMES
from .stats import HetCacheStats


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def runtimes(model: torch.nn.Module) -> list:
    """The live hetcache runtimes (rewritten or fallback) compiled from ``model``'s graphs."""
    ids = {id(p) for p in _unwrap(model).parameters()}
    found = [rt for rt in list(LIVE_RUNTIMES) if rt.parameter_ids & ids]
    return sorted(found, key=id)


def stats(model: torch.nn.Module) -> HetCacheStats:
    """Step counts by kind (per branch and in total), cache bytes, compile seconds, fallbacks.

    >>> s = stats(torch.nn.Linear(2, 2))      # a model never compiled with hetcache
    >>> s.steps["reuse"], s.graphs
    (0, 0)
    """
    total = HetCacheStats()
    for runtime in runtimes(model):
        total.graphs += 1
        if getattr(runtime, "fallback_reason", None):
            total.fallback_reasons.append(runtime.fallback_reason)
            total.steps["full"] += runtime.calls
            total.compile_seconds["fallback"] = total.compile_seconds.get("fallback", 0.0) + runtime.compile_seconds
            continue
        for branch in runtime.branch_stats():
            total.merge_branch(branch)
        for variant in runtime.variants():
            total.compile_seconds[variant.name] = total.compile_seconds.get(variant.name, 0.0) + variant.compile_seconds
            total.compile_counts[variant.name] = total.compile_counts.get(variant.name, 0) + variant.compile_count
    return total


def set_mask(model: torch.nn.Module, mask: torch.Tensor | None) -> None:
    """Give ``model`` the edit mask: the spatial prior for models whose inputs carry none.

    ``mask`` is a bool token grid ``[F', H', W']`` or a pixel mask video ``[F, H, W]`` (Wan's VAE
    factors: 4x frames with the first alone, 8x pixels, then the patch), each optionally with a
    batch dimension first; nonzero means *edit this*. It overrides a mask read from the inputs
    (VACE's control channels) until ``set_mask(model, None)``. Setting it starts a new run.
    Raises ``ValueError`` naming the expected grids when the shape fits an already compiled graph
    of ``model`` neither way (graphs compiled later check it on their first call).
    """
    target = _unwrap(model)
    for runtime in runtimes(target):
        grid = getattr(runtime, "grid", None)
        if mask is not None and grid is not None:
            mask_to_token_grid(mask, grid.grid, grid.patch)
    USER_MASKS.set(target, mask)
    reset(target)


def reset(model: torch.nn.Module) -> None:
    """Forget every cache of ``model`` (a new video starts). Runs also reset themselves."""
    for runtime in runtimes(model):
        runtime.reset()


def explain(model: torch.nn.Module) -> str:
    """The analysis report of each compiled graph, or why a rewrite was refused."""
    found = runtimes(model)
    if not found:
        return "hetcache: no compiled graph found for this model (has it been called since torch.compile?)"
    return "\n\n".join(f"graph {i}:\n{runtime.report}" for i, runtime in enumerate(found))
