"""Flux.1 (text-to-image, and the Kontext/Fill variants' transformer) in diffusers.

Its latents come packed, one row per 2 x 2 latent cells (``[B, N, C]``); two-stream blocks, then
single-stream blocks over the prompt's rows joined before the image's. The RoPE tables are computed
inside the model from ``txt_ids`` joined to ``img_ids`` (one row per image token): ``img_ids`` is
gathered with the selected tokens, so the tables cover the prompt's rows and the selected tokens.
The token grid is not in the graph: ``set_mask`` takes a token grid ``[H', W']`` (``height / 16`` x
``width / 16``). Flux Fill's mask channels are not read yet (packed, they carry no grid).
"""

from ..passes.hints import GraphHints
from .base import ModelFamily

FAMILY = ModelFamily(
    name="flux",
    modules=("transformer_flux",),
    pixel_factors=(1, 8, 8),
    hints=GraphHints(text_inputs=("encoder_hidden_states", "pooled_projections", "txt_ids"),
                     token_tables=(("img_ids", 0),)),
)
