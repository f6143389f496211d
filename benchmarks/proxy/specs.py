"""The trained proxies, by name: which data they learned, where their weights are, how they were trained.

=========  ==========================  =================  ======================  =================
name       data                        latents [C,F,H,W]  tokens (a frame, all)   weights
=========  ==========================  =================  ======================  =================
tiles      ``data.py``                 4 x 3 x 12 x 12    6 x 6, 108              ``weights/``
scenes     ``scenes.py``               4 x 3 x 32 x 56    16 x 28, 1344           ``weights_scenes/``
=========  ==========================  =================  ======================  =================

Both are the same ``WanVACETransformer3DModel`` architecture (``model.PROXY_CONFIG``); Wan's 3-D
RoPE makes attention depend on relative positions only, so one architecture serves both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from . import data, scenes
from .model import PROXY_CONFIG

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ProxySpec:
    """One trained proxy: its data module (``make_batch``, ``heldout_seeds``, ``MASK_KINDS``, sizes) and weights."""

    name: str
    data: ModuleType
    weights_dir: Path
    train_defaults: dict = field(default_factory=dict)  # train.py's defaults for this proxy

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.data.CHANNELS, self.data.FRAMES, self.data.HEIGHT, self.data.WIDTH)

    @property
    def num_tokens(self) -> int:
        pf, ph, pw = PROXY_CONFIG["patch_size"]
        return (self.data.FRAMES // pf) * (self.data.HEIGHT // ph) * (self.data.WIDTH // pw)


PROXIES: dict[str, ProxySpec] = {
    "tiles": ProxySpec("tiles", data, HERE / "weights"),
    "scenes": ProxySpec(
        "scenes", scenes, HERE / "weights_scenes",
        # most steps on 16 x 28-cell crops (1.6x cheaper a token: attention is quadratic), then
        # full frames, so that the model also sees the long distances it is evaluated on
        train_defaults=dict(steps=3600, crop_steps=2800, crop_size=(16, 28), crop_batch=16, batch=6, lr=2e-3,
                            warmup=150, pool=4096, time_limit=80.0),
    ),
}


def get_proxy(name: str) -> ProxySpec:
    if name not in PROXIES:
        raise ValueError(f"unknown proxy {name!r}; choose one of {sorted(PROXIES)}")
    return PROXIES[name]
