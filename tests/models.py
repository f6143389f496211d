"""Tiny random-weight diffusers components shared by the tests, the demo and the benchmarks."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel


def tiny_vace_transformer(num_layers: int = 4, vace_layers=(0, 2), heads: int = 2, head_dim: int = 12,
                          text_dim: int = 32, ffn_dim: int = 32, seed: int = 0) -> WanVACETransformer3DModel:
    torch.manual_seed(seed)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=ffn_dim, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        vace_layers=list(vace_layers), vace_in_channels=96,
    )
    return model.eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_vace_pipeline(transformer: WanVACETransformer3DModel | None = None) -> WanVACEPipeline:
    return WanVACEPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer if transformer is not None else tiny_vace_transformer(),
    )


def transformer_inputs(batch: int = 1, frames: int = 3, height: int = 8, width: int = 8, text_len: int = 5,
                       text_dim: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, frames, height, width, generator=generator),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=generator),
        "control_hidden_states": vace_control(box_mask(frames, height, width, batch=batch)),
    }


def box_mask(frames: int = 3, height: int = 8, width: int = 8, box=(2, 6, 2, 6), batch: int = 1) -> torch.Tensor:
    """Latent-resolution edit mask ``[B, F, H, W]``: 1 inside ``box = (top, bottom, left, right)``."""
    mask = torch.zeros(batch, frames, height, width)
    top, bottom, left, right = box
    mask[:, :, top:bottom, left:right] = 1.0
    return mask


def vace_control(latent_mask: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """``control_hidden_states`` as WanVACEPipeline builds it: 32 latent channels, then 64 mask channels."""
    generator = torch.Generator().manual_seed(seed)
    batch, frames, height, width = latent_mask.shape
    latents = torch.randn(batch, 32, frames, height, width, generator=generator)
    return torch.cat([latents, latent_mask.unsqueeze(1).expand(-1, 64, -1, -1, -1)], dim=1)


def edit_inputs(frames: int = 9, height: int = 64, width: int = 64, text_len: int = 5, text_dim: int = 32,
                seed: int = 0, box: tuple[float, float, float, float] = (0.25, 0.75, 0.25, 0.75)) -> dict:
    """A masked video edit for ``WanVACEPipeline``: random video, a box mask (``box`` = top, bottom,
    left, right as fractions of the frame; centred by default), text embeddings."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(frames, height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    video = [Image.fromarray(frame) for frame in pixels]
    mask_array = torch.zeros(height, width, dtype=torch.uint8)
    top, bottom, left, right = box
    mask_array[round(top * height): round(bottom * height), round(left * width): round(right * width)] = 255
    mask = [Image.fromarray(mask_array.numpy()) for _ in range(frames)]
    return {
        "video": video,
        "mask": mask,
        "prompt_embeds": torch.randn(1, text_len, text_dim, generator=generator),
        "negative_prompt_embeds": torch.randn(1, text_len, text_dim, generator=generator),
        "height": height,
        "width": width,
        "num_frames": frames,
    }


class ToyBlock(torch.nn.Module):
    """A self-attention block for toy graphs; ``mix_tokens`` adds a mean over tokens (not token-local)."""

    def __init__(self, dim: int = 16, mix_tokens: bool = False):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.mix_tokens = mix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return out + x.mean(dim=1, keepdim=True) if self.mix_tokens else out


def add_lora(model: torch.nn.Module, name: str, seed: int) -> None:
    """A peft LoRA adapter ``name`` of rank 4 on every attention projection, randomly initialised (not zero)."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)
    model.add_adapter(config, adapter_name=name)
