"""Stable Diffusion 3 / 3.5 in diffusers: full and reuse steps; partial steps refused, with the reason.

Its latents are 4-D images (``[B, C, H, W]``), and its joint attention splits the image rows from the
prompt rows at the image token count Dynamo traced (``hidden_states[:, :residual.shape[1]]``), which
a partial step's fewer rows would cut wrongly; the token-locality check refuses it by name.
"""

from .base import ModelFamily

FAMILY = ModelFamily(
    name="sd3",
    modules=("transformer_sd3",),
    classes=("JointTransformerBlock",),  # its blocks live in diffusers.models.attention
    pixel_factors=(1, 8, 8),
    limits="4-D image latents, and joint attention that splits image from prompt rows at the traced token count: "
           "partial steps are not supported yet; full and reuse steps run",
)
