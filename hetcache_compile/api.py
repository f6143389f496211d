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


def _parameter_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in _unwrap(model).parameters()}


def runtimes(model: torch.nn.Module) -> list:
    """The live hetcache runtimes (rewritten or fallback) that were compiled from ``model``'s graphs or
    have run for it. A graph Dynamo shares between instances of a class is listed for each."""
    ids = _parameter_ids(model)
    found = [rt for rt in list(LIVE_RUNTIMES) if rt.serves(ids)]
    return sorted(found, key=lambda rt: (rt.frame_id, id(rt)))


def stats(model: torch.nn.Module) -> HetCacheStats:
    """Model calls by step kind (per branch and in total), cache bytes, compile seconds, fallbacks.

    Only this model's calls count, even when Dynamo shares its graphs with other instances of its
    class. ``calls`` counts model calls, ``graph_calls`` the calls of all its graphs (graph breaks
    split a model into several). A call that no rewritten graph served counts as full. Statistics
    live with the compiled graphs: ``torch._dynamo.reset()`` discards them.

    >>> s = stats(torch.nn.Linear(2, 2))      # a model never compiled with hetcache
    >>> s.steps["reuse"], s.graphs, s.calls
    (0, 0, 0)
    """
    ids = _parameter_ids(model)
    found = runtimes(model)
    total = HetCacheStats()
    entry_frame = min((rt.frame_id for rt in found), default=None)
    per_block_calls = 0  # graphs of one block each (regional compilation): every model call runs them all
    for runtime in found:
        calls = runtime.calls(ids)
        total.graphs += 1
        total.graph_calls += calls
        if runtime.frame_id == entry_frame and getattr(runtime, "per_block", False):
            per_block_calls = max(per_block_calls, calls)
        elif runtime.frame_id == entry_frame:
            total.model_calls += calls
        if getattr(runtime, "fallback_reason", None):
            total.fallback_reasons.append(runtime.fallback_reason)
            total.compile_seconds["fallback"] = total.compile_seconds.get("fallback", 0.0) + runtime.compile_seconds
            continue
        for branch in runtime.branch_stats(ids):
            total.merge_branch(branch)
        for variant in runtime.variants():
            name = variant.name
            total.compile_seconds[name] = total.compile_seconds.get(name, 0.0) + variant.compile_seconds
            total.compile_counts[name] = total.compile_counts.get(name, 0) + variant.compile_count
            total.compiled_pieces[name] = total.compiled_pieces.get(name, 0) + variant.compiled_pieces
            total.cache_hits[name] = total.cache_hits.get(name, 0) + variant.cache_hits
    total.model_calls += per_block_calls
    total.steps["full"] += max(0, total.model_calls - sum(total.steps.values()))
    order = {"cond": 0, "uncond": 1}
    total.branches = dict(sorted(total.branches.items(), key=lambda item: (order.get(item[0], 2), item[0])))
    return total


def set_mask(model: torch.nn.Module, mask: torch.Tensor | None) -> None:
    """Give ``model`` the edit mask: the spatial prior for models whose inputs carry none.

    ``mask`` is a token grid ``[F', H', W']`` or a pixel mask video ``[F, H, W]`` (the family's VAE
    factors, Wan's: 4x frames with the first alone, 8x pixels, then the patch), each optionally with a
    batch dimension first; an image model also takes ``[H', W']`` or ``[H, W]``. Models whose latents
    come packed have no grid in the graph: their position ids give it (Flux), or the mask's own shape
    (LTX-Video, Qwen-Image: a token grid of the model's token count in the order the pipeline packs
    them, or a pixel mask of such a grid). A value above 0.5 (or True) means *edit this*, in either
    form, and a mask that is not binary gets a warning. It applies to this model only (not to other
    instances of its class) and overrides a mask read from the inputs (VACE's control channels, Flux
    Fill's) until ``set_mask(model, None)``. Setting it starts a new run. Raises ``ValueError`` naming
    the expected grids when the shape fits none of the resolutions ``model`` was compiled for; a call
    at a resolution the mask does not fit raises the same error.
    """
    target = _unwrap(model)
    grids = {rt.grid.grid: (rt.grid, rt.family.pixel_factors) for rt in runtimes(target)
             if getattr(rt, "grid", None) is not None and not rt.grid.packed}  # packed: checked at the call
    if mask is not None and grids:
        errors = []
        for grid, pixel_factors in grids.values():
            try:
                mask_to_token_grid(mask, grid.grid, grid.patch, pixel_factors)
                break
            except ValueError as error:
                errors.append(str(error))
        else:
            raise ValueError(errors[0] if len(errors) == 1 else "; ".join(errors))
    USER_MASKS.set(target, mask)
    reset(target)


def reset(model: torch.nn.Module) -> None:
    """Forget every cache of ``model`` (a new video starts); other instances keep theirs. Runs also
    reset themselves (the timestep went up, or a conditioning input changed)."""
    ids = _parameter_ids(model)
    for runtime in runtimes(model):
        runtime.reset(ids)


def finish_compiling(model: torch.nn.Module) -> None:
    """Wait until the variants ``model`` has run are compiled, and load them. With Inductor they compile in the
    compile worker, a subprocess (``background_compile``), while the model steps on with the pieces not compiled
    yet; call this before timing steady-state speed, or before the process exits to leave every piece in
    Inductor's cache for the next one."""
    for runtime in runtimes(model):
        finish = getattr(runtime, "finish_compiling", None)
        if finish is not None:
            finish()


def explain(model: torch.nn.Module) -> str:
    """The analysis report of each compiled graph, or why a rewrite was refused."""
    found = runtimes(model)
    if not found:
        return "hetcache: no compiled graph found for this model (has it been called since torch.compile?)"
    return "\n\n".join(f"graph {i}:\n{runtime.report}" for i, runtime in enumerate(found))
