"""Data of the second proxy ("scenes"): large latent frames laid out in regions, with a panning camera.

The first proxy's clips (``data.py``) are 12 x 12 latent cells, 6 x 6 tokens a frame: at HetCache's
default ``margin_radius`` of 5 tokens every unedited token is margin, so context selection never
runs. These clips have Wan2.1's token geometry at a smaller scale: 32 x 56 latent cells a frame
(a 256 x 448 video with Wan's 8x VAE), 16 x 28 tokens with patch (1, 2, 2), 3 latent frames,
1344 tokens a clip; a 25% box leaves context tokens at the default margin.

The structure differs in kind from the first proxy's (a gradient with one scrolling texture under
small objects) and is long-range by construction:

- a **layout** of 2 to 4 straight lines right across the frame, which cut it into regions; each
  region has its own colour and its own one-token texture (period 2 cells, as ``data.py`` explains,
  so a copy from any visible token of the region is exact and a blur is not). To fill a hidden
  token a model has to tell which region it lies in, that is, continue the lines from both sides
  of the hole, however far away they are seen;
- a **panning camera**: the whole layout moves at 0.5 to 2 cells a frame, so what a static mask
  hides in one frame is visible in another, at a displacement that varies per clip;
- 1 to 4 textured **objects** (boxes, ellipses, 3 to 7 cells a side from their centre) crossing the
  frame at 1 to 3 cells a frame over the layout.

Masks (``[F, H, W]``, 1 = hidden), by ``seed % 4``:

- ``box``: a static rectangle of 8 to 18 x 12 to 30 cells (5% to 30% of the frame);
- ``blob``: a static union of 2 or 3 overlapping ellipses;
- ``moving``: an 8 to 14-cell box following the topmost object, frame by frame;
- ``outpaint``: a static strip along one edge, 20% to 35% of the frame across (the edit extends the
  video beyond what was filmed; the lines and the pan tell what is there).

Everything is a function of the seed (CPU generators), as in ``data.py``, whose helpers this
module reuses; training seeds lie below ``HELDOUT_SEED_BASE``, held-out seeds from it on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .data import (
    CHANNELS,
    HELDOUT_SEED_BASE,
    SUPERSAMPLE,
    Clip,
    _Draw,
    _mask_kind,
    _object_centre,
    _paint_object,
    _supersampled_grid,
    _texture,
    heldout_seeds,
    stack_clips,
    train_seeds,
)

FRAMES = 3
HEIGHT = 32   # 16 tokens
WIDTH = 56    # 28 tokens
MASK_KINDS = ("box", "blob", "moving", "outpaint")
SCALE = 1.4  # set so the latents' standard deviation is about 1 (see __main__)
# A region's one-token texture outweighs its colour: the colour is what a blur recovers from the
# hole's rim, the texture what only a copy from the same region recovers (SCREENING.md).
REGION_TEXTURE_SCALE = 1.5
REGION_COLOUR_SCALE = 0.4
OBJECT_TEXTURE_SCALE = 0.5

__all__ = ["CHANNELS", "FRAMES", "HEIGHT", "WIDTH", "MASK_KINDS", "HELDOUT_SEED_BASE", "make_clip", "make_batch",
           "train_seeds", "heldout_seeds"]


def _layout(d: _Draw, height: int, width: int):
    """Random lines across the frame and a colour + texture per region; returns ``paint(x, y) -> [C, ...]``."""
    lines = []
    for _ in range(d.integer(2, 4)):
        angle = d.uniform(0, math.pi)
        nx, ny = math.cos(angle), math.sin(angle)
        px, py = d.uniform(0.2, 0.8) * width, d.uniform(0.2, 0.8) * height  # a point the line passes
        lines.append((nx, ny, nx * px + ny * py))
    regions = [(d.colour(REGION_COLOUR_SCALE), _texture(d, REGION_TEXTURE_SCALE)) for _ in range(2 ** len(lines))]

    def paint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        code = torch.zeros(x.shape, dtype=torch.long)
        for bit, (nx, ny, offset) in enumerate(lines):
            code |= ((nx * x + ny * y) > offset).long() << bit
        out = torch.zeros(CHANNELS, *x.shape)
        for index in torch.unique(code).tolist():
            colour, texture = regions[index]
            inside = code == index
            out = torch.where(inside, colour[:, None, None] + texture(x, y), out)
        return out

    return paint


def _mask(d: _Draw, kind: str, frames: int, height: int, width: int, track) -> torch.Tensor:
    mask = torch.zeros(frames, height, width)
    cy, cx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    if kind == "box":
        h, w = d.integer(min(8, height - 1), min(18, height - 1)), d.integer(min(12, width - 1), min(30, width - 1))
        top, left = d.integer(0, height - h), d.integer(0, width - w)
        mask[:, top:top + h, left:left + w] = 1.0
    elif kind == "blob":
        mx, my = d.uniform(0.25, 0.75) * width, d.uniform(0.25, 0.75) * height
        blob = torch.zeros(height, width, dtype=torch.bool)
        for _ in range(d.integer(2, 3)):
            ex, ey = mx + d.uniform(-5.0, 5.0), my + d.uniform(-4.0, 4.0)
            rx, ry = d.uniform(4.0, 9.0), d.uniform(3.0, 7.0)
            blob |= ((cx - ex) / rx) ** 2 + ((cy - ey) / ry) ** 2 <= 1
        mask[:] = blob.float()
    elif kind == "moving":
        h, w = d.integer(8, 14), d.integer(8, 14)
        off_x, off_y = d.uniform(-2.0, 2.0), d.uniform(-2.0, 2.0)
        for t in range(frames):
            x, y = track(t)
            left = min(max(round(x + off_x - w / 2), 0), width - w)
            top = min(max(round(y + off_y - h / 2), 0), height - h)
            mask[t, top:top + h, left:left + w] = 1.0
    else:  # outpaint: a strip along one edge
        edge, share = d.choice(("left", "right", "top", "bottom")), d.uniform(0.2, 0.35)
        if edge in ("left", "right"):
            size = max(1, round(share * width))
            mask[:, :, :size] = 1.0
            if edge == "right":
                mask = mask.flip(2)
        else:
            size = max(1, round(share * height))
            mask[:, :size, :] = 1.0
            if edge == "bottom":
                mask = mask.flip(1)
    return mask


def make_clip(seed: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
              kind: str | None = None) -> Clip:
    """The clip of ``seed``: clean latents ``[C, F, H, W]`` and a mask of ``kind`` (default by ``seed % 4``)."""
    kind = _mask_kind(seed, kind, MASK_KINDS)
    d = _Draw(seed)
    gy, gx = _supersampled_grid(height, width)

    paint = _layout(d, height, width)
    pan = (d.uniform(0.5, 2.0) * d.choice((-1, 1)), d.uniform(0.0, 1.0) * d.choice((-1, 1)))  # cells a frame

    objects = []
    for _ in range(d.integer(1, 4)):
        speed, heading = d.uniform(1.0, 3.0), d.uniform(0, 2 * math.pi)
        objects.append(dict(
            shape=d.choice(("box", "ellipse")), a=d.uniform(3.0, 7.0), b=d.uniform(3.0, 7.0),
            mid=(d.uniform(0.15, 0.85) * width, d.uniform(0.15, 0.85) * height),
            velocity=(speed * math.cos(heading), speed * math.sin(heading)),
            colour=d.colour(1.0), texture=_texture(d, OBJECT_TEXTURE_SCALE),
        ))

    video = []
    for t in range(frames):
        dt = t - (frames - 1) / 2
        frame = paint(gx - pan[0] * dt, gy - pan[1] * dt)
        for obj in objects:
            frame = _paint_object(frame, obj, _object_centre(obj, t, frames), gx, gy)
        video.append(F.avg_pool2d(frame[None], SUPERSAMPLE)[0])
    x0 = torch.stack(video, dim=1) * SCALE
    mask = _mask(d, kind, frames, height, width, lambda t: _object_centre(objects[-1], t, frames))
    return Clip(x0=x0, mask=mask, kind=kind, seed=seed)


def make_batch(seeds: Iterable[int], **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack clips: ``x0 [B, C, F, H, W]``, ``mask [B, F, H, W]``, and the mask kinds."""
    return stack_clips([make_clip(seed, **kwargs) for seed in seeds])


if __name__ == "__main__":  # the data's statistics
    import time

    torch.set_num_threads(1)
    start = time.perf_counter()
    x0, mask, kinds = make_batch(train_seeds(0, 400))
    print(f"400 clips in {time.perf_counter() - start:.1f} s; x0 mean {x0.mean():.3f} std {x0.std():.3f}")
    for k in MASK_KINDS:
        sel = torch.tensor([kk == k for kk in kinds])
        print(f"{k}: hidden share {mask[sel].mean():.3f}")
