"""HunyuanVideo (text-to-video) in diffusers.

Two-stream blocks attend over the video tokens followed by the prompt's, with a key-padding mask for
the padded prompt rows; single-stream blocks do the same on one joined sequence and split it again.
The graph tells all of it: the prompt rows are computed every step, only video tokens are selected
and cached (their rows come first, so the mask lines up with the cached keys). Its prompt refiner
(``context_embedder.token_refiner``) attends over text only and runs in full. The VAE packs 4 frames
and 8 x 8 pixels in a latent cell. No input carries an edit mask (``set_mask`` supplies it).
"""

from ..passes.hints import GraphHints
from .base import ModelFamily

FAMILY = ModelFamily(
    name="hunyuan_video",
    modules=("transformer_hunyuan_video",),
    pixel_factors=(4, 8, 8),
    hints=GraphHints(text_inputs=("encoder_hidden_states", "pooled_projections")),
)
