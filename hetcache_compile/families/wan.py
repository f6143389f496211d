"""Wan 2.1 / 2.2 (text-, image-to-video), Wan-VACE and SkyReels-V2 in diffusers.

VACE's ``control_hidden_states`` carries the edit mask in its last 64 channels, the 8 x 8 mask
pixels of each latent cell (``WanVACEPipeline.prepare_masks``). Wan's VAE packs 4 frames (the first
alone) and 8 x 8 pixels in a latent cell. TeaCache's published polynomial for Wan2.1 T2V-1.3B
rescales the timestep-embedding change ("ret_steps" mode).
"""

from .base import MaskChannels, ModelFamily

FAMILY = ModelFamily(
    name="wan",
    modules=("transformer_wan", "transformer_wan_vace", "transformer_skyreels_v2"),
    pixel_factors=(4, 8, 8),
    mask_input=MaskChannels(input_name="control_hidden_states", channels=64, pixels_per_cell=(8, 8)),
    rescale_polynomials={
        "wan2.1-1.3b": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    },
)
