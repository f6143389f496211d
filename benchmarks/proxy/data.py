"""Procedural masked-video inpainting clips, generated directly in a latent space.

Why latents and not pixels: the proxy model only has to give the quality benchmarks a transformer
whose attention means something (context tokens carry the information the edited tokens need).
Rendering pixels and encoding them with a VAE would add a VAE we do not have trained weights for
(nothing can be downloaded here) and most of the compute; a random-weight VAE would only scramble
the structure. So a clip is a ``[C, F, H, W]`` tensor ``x0`` that stands for *normalised* video
latents (zero-mean, about unit variance per channel, like Wan's ``(z - latents_mean) / latents_std``),
with the kind of structure a video has after a VAE's 8x spatial / 4x temporal compression:

- a background that moves: a linear colour gradient plus a fine texture that scrolls at a random
  speed;
- 1 to 3 objects drawn over it, each a box or an ellipse (4..7 cells across) with its own fine
  texture (fixed to the object, so it moves with it), moving on a straight line at 1..2.5 cells per
  frame, so that what a static mask hides in one frame is mostly visible in another;
- every "colour" is a random C-vector (one latent value per channel), so a region is identified by
  its channel signature, its texture and its motion.

Two choices make the hidden content something a small transformer can learn to infer in 30 CPU
minutes, where a blur cannot (``benchmarks/proxy/README.md`` has the screening that chose them):

- ``CHANNELS = 4``, not Wan's 16: a (1, 2, 2) patch of 16 channels is 64 values, which the proxy's
  96-wide residual stream has to carry (the noise it is given) next to its estimate of what is
  hidden; with 16 channels the small model stayed below a blur fill, with 4 it beats it;
- the textures are periodic in 2 cells (one token) along each axis, a random sum of three Fourier
  terms: every token of a region carries the same 2 x 2-cell pattern, so a hidden token's pattern
  is in every visible token of its region (an attention copy), while a blur averages it away.

Shapes are rendered 4x super-sampled and box-filtered to the latent grid, so edges are soft, as
latents of a blurred pixel edge are.

Each clip comes with a latent-resolution mask ``[F, H, W]`` (1 = hidden, to be generated) of one
of three kinds, taken in turn by ``seed % 3``:

- ``box``: a static rectangle (3..6 cells a side);
- ``blob``: a static union of 2 or 3 overlapping ellipses;
- ``moving``: a 3..5-cell box that follows the topmost object frame by frame (offset from its
  centre), covering part of it, as when an edit tracks an object.

What is hidden can be inferred from the context: the textures repeat, objects pass through static
masks and are visible in other frames, and a tracked object shows its colour and texture around
the box. A model that attends to the right context tokens beats a local fill.

Everything is a function of the clip's seed (one ``torch.Generator`` per clip, CPU Mersenne
Twister, so the same on every machine). Seeds ``[0, HELDOUT_SEED_BASE)`` are for training,
seeds from ``HELDOUT_SEED_BASE`` on are held out for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHANNELS = 4   # latent channels (not Wan's 16: see the module docstring)
FRAMES = 3     # latent frames: 9 video frames with Wan's 4x temporal compression
HEIGHT = 12    # latent cells: 96 pixels with Wan's 8x spatial compression
WIDTH = 12
MASK_KINDS = ("box", "blob", "moving")
HELDOUT_SEED_BASE = 1_000_000_000  # train: seeds below; held out: this and above
SUPERSAMPLE = 4
SCALE = 1.0 / 0.725  # brings the latents' standard deviation to about 1 (measured over 3000 train clips)
TEXTURE_PERIOD = 2  # cells, along each axis: one (1, 2, 2) patch
BACKGROUND_TEXTURE_SCALE = 1.0
OBJECT_TEXTURE_SCALE = 0.5
# Fourier terms of a texture with TEXTURE_PERIOD 2; (2, 0) and higher would repeat every cell and
# be averaged away by the box filter.
TEXTURE_HARMONICS = ((1, 0), (0, 1), (1, 1), (1, -1))

__all__ = [
    "CHANNELS", "FRAMES", "HEIGHT", "WIDTH", "MASK_KINDS", "HELDOUT_SEED_BASE", "Clip",
    "make_clip", "make_batch", "train_seeds", "heldout_seeds",
]


@dataclass
class Clip:
    x0: torch.Tensor    # [C, F, H, W] clean latents
    mask: torch.Tensor  # [F, H, W] float, 1 = hidden (to generate), 0 = known
    kind: str           # one of MASK_KINDS
    seed: int


def train_seeds(start: int, count: int) -> range:
    """Seeds of training clips ``start .. start + count - 1``."""
    if start < 0 or start + count > HELDOUT_SEED_BASE:
        raise ValueError(f"training seeds must lie in [0, {HELDOUT_SEED_BASE})")
    return range(start, start + count)


def heldout_seeds(count: int, start: int = 0) -> range:
    """Seeds of held-out clips, never seen in training."""
    return range(HELDOUT_SEED_BASE + start, HELDOUT_SEED_BASE + start + count)


class _Draw:
    """Scalar and vector draws from one clip's generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g))

    def integer(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``."""
        return int(torch.randint(lo, hi + 1, (), generator=self.g))

    def choice(self, options: Sequence):
        return options[self.integer(0, len(options) - 1)]

    def colour(self, scale: float) -> torch.Tensor:
        return scale * torch.randn(CHANNELS, generator=self.g)


def _texture(d: _Draw, scale: float):
    """A random ``CHANNELS``-vector texture periodic in ``TEXTURE_PERIOD`` cells along x and y.

    The sum of three Fourier terms, each a random harmonic, phase and colour (``scale / sqrt(3)``
    per term, so about ``scale`` in all); returns ``texture(x, y) -> [CHANNELS, *x.shape]``.
    """
    terms = []
    for _ in range(3):
        fx, fy = d.choice(TEXTURE_HARMONICS)
        terms.append((fx / TEXTURE_PERIOD, fy / TEXTURE_PERIOD, d.uniform(0, 2 * math.pi),
                      d.colour(scale / math.sqrt(3))))

    def texture(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(c[:, None, None] * torch.cos(2 * math.pi * (fx * x + fy * y) + phase)[None]
                   for fx, fy, phase, c in terms)

    return texture


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _mask_kind(seed: int, kind: str | None, kinds: Sequence[str]) -> str:
    """``kind``, or the seed's turn among ``kinds``; a ``ValueError`` for a kind not among them."""
    kind = kind or kinds[seed % len(kinds)]
    if kind not in kinds:
        raise ValueError(f"kind must be one of {tuple(kinds)}, got {kind!r}")
    return kind


def _supersampled_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell coordinates ``(gy, gx)`` of the ``SUPERSAMPLE``-times finer grid shapes are drawn on."""
    s = SUPERSAMPLE
    ys = (torch.arange(height * s, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(width * s, dtype=torch.float32) + 0.5) / s
    return torch.meshgrid(ys, xs, indexing="ij")


def _object_centre(obj: dict, t: int, frames: int) -> tuple[float, float]:
    """Where an object moving at ``velocity`` from ``mid`` (its centre in the middle frame) is in frame ``t``."""
    dt = t - (frames - 1) / 2
    return obj["mid"][0] + obj["velocity"][0] * dt, obj["mid"][1] + obj["velocity"][1] * dt


def _paint_object(frame: torch.Tensor, obj: dict, centre: tuple[float, float], gx: torch.Tensor,
                  gy: torch.Tensor) -> torch.Tensor:
    """``frame`` with ``obj`` (a box or an ellipse, half sizes ``a``, ``b``; colour + texture) drawn at ``centre``."""
    dx, dy = gx - centre[0], gy - centre[1]
    if obj["shape"] == "box":
        inside = (dx.abs() <= obj["a"]) & (dy.abs() <= obj["b"])
    else:
        inside = (dx / obj["a"]) ** 2 + (dy / obj["b"]) ** 2 <= 1
    return torch.where(inside, obj["colour"][:, None, None] + obj["texture"](dx, dy), frame)


def make_clip(seed: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
              kind: str | None = None) -> Clip:
    """The clip of ``seed``: clean latents and a mask of ``kind`` (default ``MASK_KINDS[seed % 3]``)."""
    kind = _mask_kind(seed, kind, MASK_KINDS)
    d = _Draw(seed)
    s = SUPERSAMPLE
    gy, gx = _supersampled_grid(height, width)

    # background: base colour + scrolling gradient + scrolling texture
    base = d.colour(0.3)
    grad_colour, grad_angle, grad_speed = d.colour(0.3), d.uniform(0, 2 * math.pi), d.uniform(-0.5, 0.5)
    background_texture = _texture(d, BACKGROUND_TEXTURE_SCALE)
    scroll_velocity = (d.uniform(-1.5, 1.5), d.uniform(-1.5, 1.5))  # cells per frame

    # objects: shape, half sizes, start and end centre, texture
    objects = []
    for _ in range(d.integer(1, 3)):
        mid = (d.uniform(2, width - 2), d.uniform(2, height - 2))  # centre in the middle frame
        speed, heading = d.uniform(1.0, 2.5), d.uniform(0, 2 * math.pi)  # cells per frame
        objects.append(dict(
            shape=d.choice(("box", "ellipse")), a=d.uniform(2.0, 3.5), b=d.uniform(2.0, 3.5),
            mid=mid, velocity=(speed * math.cos(heading), speed * math.sin(heading)),
            colour=d.colour(1.0), texture=_texture(d, OBJECT_TEXTURE_SCALE),
        ))

    video = []
    for t in range(frames):
        u, _ = _rotate(gx, gy, grad_angle)
        ramp = (u - grad_speed * t) / max(height, width) * 2
        frame = (base[:, None, None] + grad_colour[:, None, None] * ramp
                 + background_texture(gx - scroll_velocity[0] * t, gy - scroll_velocity[1] * t))
        for obj in objects:
            frame = _paint_object(frame, obj, _object_centre(obj, t, frames), gx, gy)
        video.append(F.avg_pool2d(frame[None], s)[0])
    x0 = torch.stack(video, dim=1) * SCALE  # [C, F, H, W]

    # mask, at cell centres
    cy_grid, cx_grid = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                                      torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    mask = torch.zeros(frames, height, width)
    if kind == "box":
        h, w = d.integer(3, min(6, height - 1)), d.integer(3, min(6, width - 1))
        top, left = d.integer(0, height - h), d.integer(0, width - w)
        mask[:, top:top + h, left:left + w] = 1.0
    elif kind == "blob":
        mx, my = d.uniform(3, width - 3), d.uniform(3, height - 3)
        blob = torch.zeros(height, width, dtype=torch.bool)
        for _ in range(d.integer(2, 3)):
            ex, ey = mx + d.uniform(-2.0, 2.0), my + d.uniform(-2.0, 2.0)
            rx, ry = d.uniform(1.3, 3.0), d.uniform(1.3, 3.0)
            blob |= ((cx_grid - ex) / rx) ** 2 + ((cy_grid - ey) / ry) ** 2 <= 1
        mask[:] = blob.float()
    else:  # moving: follows the topmost object
        obj = objects[-1]
        h, w = d.integer(3, 5), d.integer(3, 5)
        off_x, off_y = d.uniform(-1.0, 1.0), d.uniform(-1.0, 1.0)
        for t in range(frames):
            cx, cy = _object_centre(obj, t, frames)
            left = min(max(round(cx + off_x - w / 2), 0), width - w)
            top = min(max(round(cy + off_y - h / 2), 0), height - h)
            mask[t, top:top + h, left:left + w] = 1.0
    return Clip(x0=x0, mask=mask, kind=kind, seed=seed)


def make_batch(seeds: Iterable[int], **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack clips: ``x0 [B, C, F, H, W]``, ``mask [B, F, H, W]``, and the mask kinds."""
    return stack_clips([make_clip(seed, **kwargs) for seed in seeds])


def stack_clips(clips: Sequence[Clip]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return torch.stack([c.x0 for c in clips]), torch.stack([c.mask for c in clips]), [c.kind for c in clips]


if __name__ == "__main__":  # quick look at the data's statistics
    import time

    torch.set_num_threads(1)
    start = time.perf_counter()
    x0, mask, kinds = make_batch(train_seeds(0, 3000))
    elapsed = time.perf_counter() - start
    print(f"3000 clips in {elapsed:.1f} s; x0 mean {x0.mean():.3f} std {x0.std():.3f}, "
          f"per-channel std {x0.std(dim=(0, 2, 3, 4)).min():.3f}..{x0.std(dim=(0, 2, 3, 4)).max():.3f}")
    for k in MASK_KINDS:
        sel = torch.tensor([kk == k for kk in kinds])
        print(f"{k}: hidden share {mask[sel].mean():.3f}, min cells per frame {mask[sel].sum(dim=(2, 3)).min():.0f}")
