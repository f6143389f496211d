"""Spatial priors: the edit mask on the DiT token grid, and the token classes it implies.

A token covers ``patch`` latent cells; with Wan's VAE (4x in time with the first frame alone,
8x in space) and patch (1, 2, 2) one token is 4 frames x 16 x 16 pixels. Classes:

- generative G: any latent cell (or pixel) under the token is masked: an edited token is never
  treated as background;
- margin M: other tokens within Euclidean distance ``radius`` (in tokens) of G, per frame;
- context C: the rest.

>>> import torch
>>> mask = torch.zeros(1, 4, 6, dtype=torch.bool); mask[0, 1, 1] = True
>>> classes = classify_tokens(mask, radius=1)
>>> classes.generative.tolist(), classes.margin.tolist()
([7], [1, 6, 8, 13])
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WAN_PIXEL_FACTORS = (4, 8, 8)  # Wan's VAE (and most video VAEs'): pixels per latent cell in time, height, width
EDIT_THRESHOLD = 0.5  # one rule for every mask form: a value above it is edited (WanVACEPipeline's own cut)


def binarize(mask: torch.Tensor, what: str) -> torch.Tensor:
    """``mask > 0.5`` as bool (a bool mask as is); warns when a float mask is not binary."""
    if mask.dtype == torch.bool:
        return mask
    values = mask.detach().float()
    soft = (values > 0) & (values < 1)
    if bool(soft.any()):
        example = float(values[soft].flatten()[0])
        warnings.warn(f"hetcache: {what} is not binary (it has values such as {example:.3g}); values above "
                      f"{EDIT_THRESHOLD} count as edited, the rest as kept", stacklevel=3)
    return values > EDIT_THRESHOLD


@dataclass(frozen=True)
class TokenClasses:
    """Sorted flat token indices (raster order over ``grid``) of each class."""

    grid: tuple[int, int, int]
    generative: torch.Tensor
    margin: torch.Tensor
    context: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


def classify_tokens(mask: torch.Tensor, radius: float) -> TokenClasses:
    """Split a token-grid mask ``[F', H', W']`` (bool; any batch already merged) into G, M, C."""
    grid = tuple(mask.shape)
    generative = mask.bool()
    r = int(math.floor(radius))
    if r > 0 and generative.any():
        offsets = torch.arange(-r, r + 1, dtype=torch.float32)
        disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()
        near = F.conv2d(generative.float().unsqueeze(1), disk[None, None], padding=r).squeeze(1) > 0
    else:
        near = generative
    margin = near & ~generative
    flat = lambda m: m.flatten().nonzero().flatten()  # noqa: E731
    return TokenClasses(grid=grid, generative=flat(generative), margin=flat(margin),
                        context=flat(~near))


def mask_from_channels(control: torch.Tensor, channels: int, patch: tuple[int, int, int],
                       what: str = "the mask in the input") -> torch.Tensor:
    """Token-grid mask ``[B, F', H', W']`` from the last ``channels`` channels of a 5-D input
    ``[B, C, F, H, W]`` holding each latent cell's mask pixels (VACE's control video: 64, 8 x 8 a cell,
    ``WanVACEPipeline.prepare_masks``); a pixel above 0.5 is edited (the pipeline's own cut)."""
    pixels = binarize(control[:, -channels:], what)
    latent_cells = pixels.any(dim=1)  # [B, F, H, W]
    return _pool_any(latent_cells, patch)


def packed_mask_from_channels(tokens: torch.Tensor, channels: int, grid: tuple[int, int, int],
                              what: str = "the mask in the input") -> torch.Tensor:
    """Token-grid mask ``[B, F', H', W']`` from the last ``channels`` channels of a packed input ``[B, N, C]``
    (one row per token, in raster order over ``grid``) holding each token's mask pixels (Flux Fill: 256,
    ``FluxFillPipeline.prepare_mask_latents``); a token with a pixel above 0.5 is edited."""
    pixels = binarize(tokens[..., -channels:], what)
    return pixels.any(dim=-1).reshape(tokens.shape[0], *grid)


def grid_from_position_ids(ids: torch.Tensor, columns: tuple[int, int], num_tokens: int) -> tuple[int, int, int] | None:
    """The token grid ``(1, H', W')`` of packed latents whose ``ids`` (``[(B,) N, D]``) give each token's
    (row, column) in ``columns``; None unless they number the rows of an ``H' x W'`` grid in raster order.

    >>> rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    >>> grid_from_position_ids(torch.stack([torch.zeros(6), rows.flatten(), cols.flatten()], -1), (1, 2), 6)
    (1, 2, 3)
    """
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[0] != num_tokens or max(columns) >= ids.shape[1]:
        return None
    rows, cols = (ids[:, c].detach().cpu().round().long() for c in columns)
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    raster = torch.arange(num_tokens)
    if height * width != num_tokens or not torch.equal(rows * width + cols, raster):
        return None
    return (1, height, width)


def _pool_any(cells: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Any-pool ``[B, F, H, W]`` by ``factors`` (exact division required)."""
    b, f, h, w = cells.shape
    pf, ph, pw = factors
    return cells.reshape(b, f // pf, pf, h // ph, ph, w // pw, pw).any(dim=(2, 4, 6))


def expected_pixel_shape(grid: tuple[int, int, int], patch: tuple[int, int, int],
                         pixel_factors: tuple[int, int, int] = WAN_PIXEL_FACTORS) -> tuple[int, int, int]:
    f, h, w = grid
    latent_frames = f * patch[0]
    return (pixel_factors[0] * (latent_frames - 1) + 1, h * patch[1] * pixel_factors[1],
            w * patch[2] * pixel_factors[2])


def mask_to_token_grid(mask: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
                       pixel_factors: tuple[int, int, int] = WAN_PIXEL_FACTORS) -> torch.Tensor:
    """Accept a token-grid mask ``[(B,) F', H', W']`` or a pixel mask video ``[(B,) F, H, W]`` (the
    VAE's ``pixel_factors`` per latent cell: the first frame alone, then that many frames a cell); for
    an image (``F' = 1``) also ``[H', W']`` or ``[H, W]``.

    Returns a bool ``[B, F', H', W']``: a value above 0.5 is edited, in either form (a warning says
    so for a mask that is not binary). Raises ``ValueError`` naming both expected grids when the
    shape fits neither.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and grid[0] == 1:
        mask = mask.unsqueeze(0)  # an image: one frame
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (3, 4):
        raise ValueError(f"hetcache mask must be a 3-D or 4-D tensor (2-D for an image), got "
                         f"{type(mask).__name__} {getattr(mask, 'shape', '')}")
    batched = mask if mask.dim() == 4 else mask.unsqueeze(0)
    spatial = tuple(batched.shape[1:])
    if spatial == tuple(grid):
        return binarize(batched, "the token-grid mask")
    pixel_shape = expected_pixel_shape(grid, patch, pixel_factors)
    if spatial == pixel_shape:
        pixels = binarize(batched, "the pixel mask")
        first, rest = pixels[:, :1], pixels[:, 1:]
        latent_frames = torch.cat([first, rest.reshape(rest.shape[0], -1, pixel_factors[0],
                                                       *rest.shape[2:]).any(dim=2)], dim=1)
        cell = (patch[0], patch[1] * pixel_factors[1], patch[2] * pixel_factors[2])
        return _pool_any(latent_frames, cell)
    raise ValueError(f"hetcache mask of shape {list(mask.shape)} does not fit this model's input: expected a "
                     f"token grid [F', H', W'] = {list(grid)} or a pixel mask video [F, H, W] = "
                     f"{list(pixel_shape)} (optionally with a batch dimension first)")


def mask_to_packed_tokens(mask: torch.Tensor, num_tokens: int, patch: tuple[int, int, int] = (1, 1, 1),
                          pixel_factors: tuple[int, int, int] = WAN_PIXEL_FACTORS) -> torch.Tensor:
    """For models whose latents come packed (``[B, N, C]``, no grid in the graph): accept a token-grid mask
    ``[(B,) F', H', W']`` of ``num_tokens`` tokens in the order the model packs them (frames, rows, columns),
    or a pixel mask ``[(B,) F, H, W]`` whose shape gives that grid (``patch`` latent cells a token,
    ``pixel_factors`` pixels a cell); ``[H', W']`` or ``[H, W]`` for an image. Returns a bool
    ``[B, F', H', W']``; raises ``ValueError`` for any other size.

    >>> mask_to_packed_tokens(torch.ones(32, 48), num_tokens=6, patch=(1, 2, 2), pixel_factors=(1, 8, 8)).shape
    torch.Size([1, 1, 2, 3])
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask.unsqueeze(0)  # an image: one frame
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4) and math.prod(mask.shape[-3:]) == num_tokens:
        return binarize(mask if mask.dim() == 4 else mask.unsqueeze(0), "the token-grid mask")
    valid = isinstance(mask, torch.Tensor) and mask.dim() in (3, 4)
    grid = _grid_of_pixels(tuple(mask.shape[-3:]), patch, pixel_factors) if valid else None
    if grid is None or math.prod(grid) != num_tokens:
        raise ValueError(f"hetcache mask of shape {list(getattr(mask, 'shape', []))} does not fit this model's input: "
                         f"its latents come packed, {num_tokens} tokens in a row, so the mask must be a token grid "
                         f"[F', H', W'] (or [H', W'] for an image) of {num_tokens} tokens, in the order the "
                         f"pipeline packs them, or a pixel mask [F, H, W] ([H, W]) of that grid ({patch} latent "
                         f"cells a token, {pixel_factors} pixels a cell), optionally with a batch dimension first")
    return mask_to_token_grid(mask, grid, patch, pixel_factors)


def _grid_of_pixels(pixels: tuple[int, int, int], patch: tuple[int, int, int],
                    pixel_factors: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The token grid a pixel mask of shape ``[F, H, W]`` covers (the inverse of ``expected_pixel_shape``)."""
    frames, height, width = pixels
    if (frames - 1) % pixel_factors[0]:
        return None
    latent = ((frames - 1) // pixel_factors[0] + 1, height / pixel_factors[1], width / pixel_factors[2])
    grid = tuple(size / p for size, p in zip(latent, patch))
    return tuple(int(g) for g in grid) if all(float(g).is_integer() and g > 0 for g in grid) else None


class MaskStore:
    """Masks set with ``hetcache_compile.set_mask``, per model, found by parameter identity."""

    def __init__(self) -> None:
        self._masks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set(self, model: torch.nn.Module, mask: torch.Tensor | None) -> None:
        if mask is None:
            self._masks.pop(model, None)
        else:
            self._masks[model] = mask.detach()

    def lookup(self, parameter: torch.Tensor | None) -> torch.Tensor | None:
        """The mask set on the model that owns ``parameter`` (a parameter a compiled graph received)."""
        if parameter is None:
            return None
        for model, mask in list(self._masks.items()):
            if any(p is parameter for p in model.parameters()):
                return mask
        return None


USER_MASKS = MaskStore()
