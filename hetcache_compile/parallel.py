"""Context parallelism with diffusers' ``enable_parallelism``: the plans hetcache provides.

``cp_plan(model)`` returns the context-parallel plan to pass as ``model.enable_parallelism(config=...,
cp_plan=cp_plan(model))``: diffusers' own ``_cp_plan`` where the class has one (``WanTransformer3DModel``),
and one for ``WanVACETransformer3DModel``, which has none in diffusers 0.42.1. The VACE plan is Wan's plus
the VACE branch: ``vace_blocks.0`` reads the patch-embedded latents (its input projection adds them to the
control stream) and the control tokens, both split along the token dimension like ``blocks.0``'s input,
so each rank's hints line up with its shard of the token stream. It works with or without hetcache.

Today hetcache refuses graphs that hold collectives and compiles them unchanged (exact; issue 15 tracks
partial and reuse steps under context parallelism).

>>> from diffusers import WanVACETransformer3DModel
>>> sorted(cp_plan(WanVACETransformer3DModel))
['', 'blocks.0', 'proj_out', 'rope', 'vace_blocks.0']
"""

from __future__ import annotations

import torch


def cp_plan(model: torch.nn.Module | type) -> dict:
    """The context-parallel plan for ``model`` (an instance or its class): its class's ``_cp_plan``, else
    hetcache's for the classes it knows. Raises ``ValueError`` naming the class otherwise."""
    cls = model if isinstance(model, type) else type(model)
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
