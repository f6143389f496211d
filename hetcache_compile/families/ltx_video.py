"""LTX-Video (0.9.x, text- and image-to-video) in diffusers.

Its latents come packed, one row per token (``[B, N, C]``, patch 1 x 1 x 1 in frames, rows,
columns order), and the transformer computes its RoPE tables from the ``num_frames``, ``height``
and ``width`` integers, which Dynamo bakes into the graph: the token grid is not in the graph, so
``set_mask`` takes a token grid of the model's token count (``[F', H', W']`` latent cells), or a pixel
mask video whose shape gives it: the VAE packs 8 frames (the first alone) and 32 x 32 pixels in a
latent cell.
"""

from .base import ModelFamily

FAMILY = ModelFamily(
    name="ltx_video",
    modules=("transformer_ltx",),
    pixel_factors=(8, 32, 32),
)
