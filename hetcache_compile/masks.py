"""Where a run's edit mask comes from, and the token classes it gives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .families import ModelFamily
from .layout import InputLayout
from .passes.token_axis import TokenGrid
from .priors import (
    USER_MASKS,
    TokenClasses,
    classify_tokens,
    mask_from_channels,
    mask_to_packed_tokens,
    mask_to_token_grid,
)


class MaskSource:
    """The edit mask of a call: the user's (``set_mask`` on the model the call is for), else the mask
    channels of the family's mask input (VACE's control video), else none (step-level caching only).

    ``token_classes(args, say)`` returns G, M, C for the batch (the union of every sample's edit) or
    None when partial steps cannot run; ``say`` reports why once.
    """

    def __init__(self, layout: InputLayout, grid: TokenGrid, margin_radius: float, family: ModelFamily):
        self.layout = layout
        self.grid = grid
        self.margin_radius = margin_radius
        self.family = family

    def token_classes(self, args: Sequence[object], say: Callable[[str], None]) -> TokenClasses | None:
        mask = self._mask(args)
        if mask is None:
            say("no mask: no input carries one and set_mask was not called; step-level caching only")
            return None
        batch = args[self.layout.latent].shape[0]
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"hetcache mask has batch {mask.shape[0]} but the model input has batch {batch}; "
                             "pass one mask per sample or a single mask for all")
        merged = mask.any(dim=0).cpu()
        if not merged.any():
            say("empty mask: nothing is edited, so no partial steps (step-level caching only)")
            return None
        return classify_tokens(merged, self.margin_radius)

    def _mask(self, args: Sequence[object]) -> torch.Tensor | None:
        user_mask = USER_MASKS.lookup(self.layout.instance_key(args))
        if user_mask is not None and self.grid.packed:
            return mask_to_packed_tokens(user_mask, self.grid.num_tokens)
        if user_mask is not None:
            return mask_to_token_grid(user_mask, self.grid.grid, self.grid.patch, self.family.pixel_factors)
        if self.layout.control is not None:
            spec = self.family.mask_input
            return mask_from_channels(args[self.layout.control], spec.channels, self.grid.patch,
                                      f"the mask in '{spec.input_name}'")
        return None
