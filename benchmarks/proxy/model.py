"""The proxy model: a small ``diffusers.WanVACETransformer3DModel`` and its VACE inputs.

``load_proxy()`` gives the trained model (``benchmarks/proxy/weights/``); ``vace_control`` builds
``control_hidden_states`` the way ``WanVACEPipeline`` does for an inpainting edit, in latent space;
``prompt_embeds`` is the fixed text embedding the model was trained with (the task has no prompt).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import WanVACETransformer3DModel

from .data import CHANNELS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "proxy.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes
MASK_CHANNELS = 64  # WanVACEPipeline.prepare_masks: one channel per pixel of the 8x8 block of a latent cell

PROXY_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=CHANNELS, out_channels=CHANNELS,
    text_dim=32, freq_dim=64, ffn_dim=192, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2],
    vace_in_channels=2 * CHANNELS + MASK_CHANNELS,  # inactive + reactive latents + mask
)
TEXT_LEN = 4
TEXT_SEED = 20260501

__all__ = [
    "WEIGHTS_DIR", "WEIGHTS_NAME", "PROXY_CONFIG", "build_model", "load_proxy", "prompt_embeds", "vace_control",
    "shift_sigma", "sha256",
]


def build_model(seed: int = 0) -> WanVACETransformer3DModel:
    """A freshly initialised proxy transformer (deterministic from ``seed``)."""
    torch.manual_seed(seed)
    return WanVACETransformer3DModel(**PROXY_CONFIG)


def load_proxy(weights_dir: str | Path = WEIGHTS_DIR) -> WanVACETransformer3DModel:
    """The trained proxy, in eval mode: ``config.json`` + ``proxy.safetensors`` from ``weights_dir``."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    model = WanVACETransformer3DModel.from_config(WanVACETransformer3DModel.load_config(weights_dir))
    missing, unexpected = model.load_state_dict(load_file(weights_dir / WEIGHTS_NAME), strict=True)
    assert not missing and not unexpected
    return model.eval()


def prompt_embeds(batch: int = 1, text_dim: int = PROXY_CONFIG["text_dim"]) -> torch.Tensor:
    """The constant ``encoder_hidden_states`` ``[batch, 4, text_dim]``: a fixed random tensor (seed ``TEXT_SEED``)."""
    generator = torch.Generator().manual_seed(TEXT_SEED)
    return torch.randn(1, TEXT_LEN, text_dim, generator=generator).expand(batch, -1, -1).contiguous()


def vace_control(x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``control_hidden_states [B, 2 C + 64, F, H, W]`` for inpainting ``mask [B, F, H, W]`` (1 = hidden) of ``x0``.

    ``WanVACEPipeline.prepare_video_latents`` encodes ``inactive = video * (1 - mask)`` and
    ``reactive = video * mask``; for inpainting the input video's hidden region is blanked, so in
    latent space ``inactive`` is ``x0`` outside the mask and 0 inside, and ``reactive`` is 0
    everywhere (it carries nothing about the hidden content). ``prepare_masks`` then appends 64
    mask channels, one per pixel of a latent cell's 8x8 block: at latent resolution all 64 equal
    the cell's mask. (With a real VAE, the blanked region encodes to the latent of grey rather
    than exactly 0, and the encoder blurs the mask edge: this is the idealised version.)
    """
    m = mask.to(x0.dtype).unsqueeze(1)  # [B, 1, F, H, W]
    video = x0 * (1 - m)                # the input video, hidden region blanked
    inactive = video * (1 - m)
    reactive = video * m                # = 0
    return torch.cat([inactive, reactive, m.expand(-1, MASK_CHANNELS, -1, -1, -1)], dim=1)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching timestep shift (``FlowMatchEulerDiscreteScheduler``): ``s * t / (1 + (s - 1) * t)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


