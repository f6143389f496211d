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
    grid_from_position_ids,
    mask_from_channels,
    mask_to_packed_tokens,
    mask_to_token_grid,
    packed_mask_from_channels,
)


class MaskSource:
    """The edit mask of a call: the user's (``set_mask`` on the model the call is for), else the mask
    channels of the family's mask input (VACE's control video, Flux Fill's latents), else none
    (step-level caching only). Packed latents get their token grid from the family's position ids
    where it has them; without, the shape of a user mask gives it (a token grid in packing order, or a
    pixel mask), and a mask read from the inputs has margins along the packed order only.

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
        """``[B, F', H', W']`` (packed latents of unknown grid: ``[B, 1, 1, N]``); None: no mask."""
        user_mask = USER_MASKS.lookup(self.layout.instance_key(args))
        grid, patch = self._grid(args)
        if user_mask is not None and grid is None:
            return mask_to_packed_tokens(user_mask, self.grid.num_tokens, patch, self.family.pixel_factors)
        if user_mask is not None:
            return mask_to_token_grid(user_mask, grid, patch, self.family.pixel_factors)
        if self.layout.control is None:
            return None
        spec = self.family.mask_input
        what, control = f"the mask in '{spec.input_name}'", args[self.layout.control]
        if spec.packed:
            return packed_mask_from_channels(control, spec.channels, grid or (1, 1, self.grid.num_tokens), what)
        return mask_from_channels(control, spec.channels, patch, what)

    def _grid(self, args: Sequence[object]) -> tuple[tuple[int, int, int] | None, tuple[int, int, int]]:
        """The token grid and the latent cells of a token; for packed latents, read from the position ids."""
        if not self.grid.packed:
            return self.grid.grid, self.grid.patch
        if self.layout.position_ids is None:
            return None, self.family.packed_patch
        spec = self.family.position_ids
        return (grid_from_position_ids(args[self.layout.position_ids], spec.columns, self.grid.num_tokens),
                self.family.packed_patch)
