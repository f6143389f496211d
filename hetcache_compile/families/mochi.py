"""Mochi 1 in diffusers: refused, with the reason.

``MochiAttnProcessor2_0`` keeps each prompt's valid rows with ``nonzero()``, an output shape that
depends on data. Dynamo breaks the graph there, inside the loop over blocks, and then skips the
transformer's forward: the graphs it compiles are fragments of blocks, none holding the block
stack, so there is nothing to rewrite. Each fragment is compiled unchanged (exact).
"""

from .base import ModelFamily

FAMILY = ModelFamily(
    name="mochi",
    modules=("transformer_mochi",),
    limits="its attention processor calls nonzero() on the prompt mask, a data-dependent shape: Dynamo breaks "
           "the graph inside the block loop and compiles only fragments of blocks, so no graph holds the block "
           "stack; compiled unchanged",
)
