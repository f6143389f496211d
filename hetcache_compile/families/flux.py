"""Flux.1 (text-to-image, Fill, Kontext) in diffusers.

Its latents come packed, one row per 2 x 2 latent cells (``[B, N, C]``); two-stream blocks, then
single-stream blocks over the prompt's rows joined before the image's. The RoPE tables are computed
inside the model from ``txt_ids`` joined to ``img_ids`` (one row per image token): ``img_ids`` is
gathered with the selected tokens, so the tables cover the prompt's rows and the selected tokens.
``img_ids`` also gives the token grid back (columns 1 and 2: row, column), so ``set_mask`` takes a
token grid ``[H', W']`` (``height / 16`` x ``width / 16``) or a pixel mask ``[H, W]``.

Flux Fill's transformer reads ``hidden_states`` = packed latents, masked-image latents and the mask:
``FluxFillPipeline.prepare_mask_latents`` folds each token's 16 x 16 mask pixels (8 x 8 a latent cell,
2 x 2 cells) into its last 256 channels. Plain Flux (64 channels) and its Depth and Canny variants
(128) carry no mask.
"""

from ..passes.hints import GraphHints
from .base import MaskChannels, ModelFamily, PositionIds

FAMILY = ModelFamily(
    name="flux",
    modules=("transformer_flux",),
    pixel_factors=(1, 8, 8),
    mask_input=MaskChannels(input_name="hidden_states", channels=256, pixels_per_cell=(16, 16), packed=True),
    position_ids=PositionIds(input_name="img_ids", columns=(1, 2)),
    packed_patch=(1, 2, 2),
    hints=GraphHints(text_inputs=("encoder_hidden_states", "pooled_projections", "txt_ids"),
                     token_tables=(("img_ids", 0),)),
)
