"""Context parallelism with diffusers' ``enable_parallelism``: the plans hetcache provides.

``cp_plan(model)`` returns the context-parallel plan to pass as ``model.enable_parallelism(config=...,
cp_plan=cp_plan(model))``: diffusers' own ``_cp_plan`` where the class has one (``WanTransformer3DModel``),
and one for ``WanVACETransformer3DModel``, which has none in diffusers 0.42.1. The VACE plan is Wan's plus
the VACE branch: ``vace_blocks.0`` reads the patch-embedded latents (its input projection adds them to the
control stream) and the control tokens, both split along the token dimension like ``blocks.0``'s input,
so each rank's hints line up with its shard of the token stream. It works with or without hetcache.

hetcache rewrites each rank's graph (Ulysses or Ring; ``sharding.py`` says how the ranks agree and balance their
partial steps). Given a model instance, ``cp_plan`` also readies the model for one Dynamo graph per rank:
diffusers' split hooks look up their argument's position with ``inspect.signature`` on their first call,
which Dynamo cannot trace, and a graph break inside the block loop makes Dynamo run the whole ``forward``
eagerly, one small graph per block. A forward pre-hook, run outside the graph, fills those positions
before the first trace: pass ``cp_plan=cp_plan(model)`` for Wan too, where it is diffusers' own plan.

>>> from diffusers import WanVACETransformer3DModel
>>> sorted(cp_plan(WanVACETransformer3DModel))
['', 'blocks.0', 'proj_out', 'rope', 'vace_blocks.0']
"""

from __future__ import annotations

import inspect

import torch


def cp_plan(model: torch.nn.Module | type) -> dict:
    """The context-parallel plan for ``model`` (an instance or its class): its class's ``_cp_plan``, else
    hetcache's for the classes it knows. Raises ``ValueError`` naming the class otherwise."""
    cls = model if isinstance(model, type) else type(model)
    if not isinstance(model, type):
        ready_for_one_graph(model)
    if cls.__name__ == "WanVACETransformer3DModel":
        return _wan_vace_plan()
    plan = getattr(cls, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"no context-parallel plan for {cls.__name__}: diffusers has none and hetcache_compile "
                         "knows only WanVACETransformer3DModel's; pass your own as enable_parallelism(cp_plan=...)")
    return plan


def _wan_vace_plan() -> dict:
    from diffusers import WanTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelInput

    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    return {**WanTransformer3DModel._cp_plan,
            "vace_blocks.0": {"hidden_states": tokens, "control_hidden_states": tokens}}


_READY = "_hetcache_split_hooks_ready"


def ready_for_one_graph(model: torch.nn.Module) -> None:
    """Install (once) a forward pre-hook on ``model`` that, outside Dynamo's graph, fills in the argument
    positions of the context-parallel split hooks ``enable_parallelism`` registers, so Dynamo traces the
    model's forward as one graph. Harmless without context parallelism (the hook finds nothing to do)."""
    if getattr(model, _READY, False):
        return
    setattr(model, _READY, True)
    model.register_forward_pre_hook(_fill_split_hook_positions)


@torch.compiler.disable
def _fill_split_hook_positions(model: torch.nn.Module, args: tuple) -> None:
    try:
        from diffusers.hooks.context_parallel import ContextParallelSplitHook
    except ImportError:  # a diffusers without context parallelism
        return
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            metadata = getattr(hook, "module_forward_metadata", None) if isinstance(
                hook, ContextParallelSplitHook) else None
            if metadata is not None and metadata.cached_parameter_indices is None and metadata._cls is not None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # as diffusers does
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}
