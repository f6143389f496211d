"""Model families: what the graph cannot tell about a model, in one small declarative module per family.

The passes find attention, the token region, the timestep and the token axes from the graph
alone. What they cannot see is declared here: which input carries the edit mask and how, the
VAE's pixels per latent cell, published schedule coefficients. ``family_of(gm)`` finds a graph's
family from the diffusers modules it was traced through; a model of no listed family gets
``GENERIC`` (no mask input: ``set_mask`` supplies the mask). Adding a family means adding a
module with its ``FAMILY`` and listing it in ``FAMILIES``.

>>> GENERIC.mask_input is None and GENERIC.pixel_factors
(4, 8, 8)
>>> rescale_polynomials()["wan2.1-1.3b"][0]
-52186.2437
"""

from __future__ import annotations

import torch.fx as fx

from . import cogvideox, flux, hunyuan_video, ltx_video, mochi, qwen_image, sd3, wan
from .base import MaskChannels, ModelFamily, PositionIds, traced_modules

GENERIC = ModelFamily(name="generic")
FAMILIES: tuple[ModelFamily, ...] = (wan.FAMILY, cogvideox.FAMILY, hunyuan_video.FAMILY, ltx_video.FAMILY, flux.FAMILY,
                                      qwen_image.FAMILY, sd3.FAMILY, mochi.FAMILY)


def family_of(gm: fx.GraphModule) -> ModelFamily:
    """The family ``gm`` was traced from (the first in ``FAMILIES`` that matches), else ``GENERIC``."""
    return next((family for family in FAMILIES if family.matches(gm)), GENERIC)


def rescale_polynomials() -> dict[str, tuple[float, ...]]:
    """Every family's named ``rescale`` coefficients."""
    return {name: coefficients for family in FAMILIES for name, coefficients in family.rescale_polynomials.items()}


__all__ = ["FAMILIES", "GENERIC", "MaskChannels", "ModelFamily", "PositionIds", "family_of", "rescale_polynomials",
           "traced_modules"]
