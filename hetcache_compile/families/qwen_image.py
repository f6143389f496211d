"""QwenImage (text-to-image and edit) in diffusers.

Latents come packed, one row per 2 x 2 latent cells (``[B, N, C]``); each block attends over the
prompt's rows followed by the image's, with a key-padding mask for padded prompt rows: the cached
image rows are put back after the prompt rows, where the mask expects image rows. The token grid is
not in the graph: ``set_mask`` takes a token grid ``[H', W']`` (``height / 16`` x ``width / 16``), or a
pixel mask ``[H, W]`` whose shape gives it.
"""

from ..passes.hints import GraphHints
from .base import ModelFamily

FAMILY = ModelFamily(
    name="qwen_image",
    modules=("transformer_qwenimage",),
    pixel_factors=(1, 8, 8),
    packed_patch=(1, 2, 2),
    hints=GraphHints(text_inputs=("encoder_hidden_states",)),
)
