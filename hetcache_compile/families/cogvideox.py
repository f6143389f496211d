"""CogVideoX (1.0 and 1.5, text-, image- and video-to-video) in diffusers.

Its patch embedding embeds the prompt and the video together and splits them, so the graph cannot
tell the prompt from the video: ``encoder_hidden_states`` is named as text. Each block carries the
text stream beside the video stream and attends over both joined; the text rows are computed every
step and only the video tokens are selected. The pipeline computes the RoPE tables
(``image_rotary_emb``, one row per video token) outside the model. Latents are ``[B, F, C, H, W]``.
The VAE packs 4 frames and 8 x 8 pixels in a latent cell. No input carries an edit mask
(``set_mask`` supplies it).
"""

from ..passes.hints import GraphHints
from .base import ModelFamily

FAMILY = ModelFamily(
    name="cogvideox",
    modules=("cogvideox_transformer_3d",),
    pixel_factors=(4, 8, 8),
    hints=GraphHints(text_inputs=("encoder_hidden_states",), token_tables=(("image_rotary_emb", 0),),
                     frames_first=True),
)
