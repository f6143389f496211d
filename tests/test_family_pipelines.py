"""End-to-end runs of diffusers' real pipelines of the other model families, the transformer compiled
by hetcache, with tiny random components and prompt embeddings given (no tokenizer or text encoder)."""

import pytest
import torch
from conftest import compile_hetcache

import hetcache_compile as hc


PARTIAL_AND_REUSE = ["full", "full", "partial", "partial", "reuse", "full"]


def _full_then_masked(pipe, generate, edit: torch.Tensor | None, branches=("cond",), schedule: str = "FFPPRF",
                      history: list[str] = PARTIAL_AND_REUSE):
    """The pipeline's full schedule equals the uncompiled pipeline; with ``edit`` given to ``set_mask``, a fixed
    schedule gives each of ``branches`` its ``history`` and stays close to it. Returns the compiled transformer."""
    expected = generate(pipe)
    transformer = pipe.transformer
    pipe.transformer = compile_hetcache(transformer, schedule="full")
    torch.testing.assert_close(generate(pipe), expected, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    if edit is not None:
        hc.set_mask(transformer, edit)
    pipe.transformer = compile_hetcache(transformer, schedule=schedule)
    image = generate(pipe)
    stats = hc.stats(pipe.transformer)
    for name in branches:
        assert stats.branches[name].history == history
    assert torch.isfinite(image).all() and (image - expected).abs().max() < 0.5
    return pipe.transformer


def _cogvideox_pipeline():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True).eval()
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def _generate_cogvideox(pipe, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 6, 16, generator=generator)
    return pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], height=64, width=64, num_frames=9,
                num_inference_steps=steps, guidance_scale=6.0, max_sequence_length=6, output_type="pt",
                generator=generator).frames


@pytest.fixture
def cogvideox():
    pipe = _cogvideox_pipeline()
    return pipe, _generate_cogvideox(pipe)


def test_cogvideox_pipeline_full_schedule_matches_the_uncompiled_pipeline(cogvideox):
    pipe, expected = cogvideox
    pipe.transformer = compile_hetcache(pipe.transformer, schedule="full")
    torch.testing.assert_close(_generate_cogvideox(pipe), expected, rtol=1e-4, atol=1e-4)
    assert hc.stats(pipe.transformer).branches["cond"].steps["full"] == 6  # batched CFG: one branch


def test_cogvideox_pipeline_with_an_edit_mask_runs_partial_and_reuse_steps(cogvideox):
    pipe, expected = cogvideox
    edit = torch.zeros(3, 4, 4, dtype=torch.bool)  # the token grid: 3 latent frames of 4 x 4 patches
    edit[:, 1:3, 1:3] = True
    hc.set_mask(pipe.transformer, edit)
    pipe.transformer = compile_hetcache(pipe.transformer, schedule="FFPPRF")
    video = _generate_cogvideox(pipe)
    stats = hc.stats(pipe.transformer)
    assert stats.branches["cond"].history == ["full", "full", "partial", "partial", "reuse", "full"]
    assert stats.token_fraction < 1 and not stats.fallback_reasons
    assert torch.isfinite(video).all() and (video - expected).abs().max() < 0.5


def _hunyuan_video_pipeline():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4)).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False).eval()
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _generate_hunyuan_video(pipe, steps: int = 6) -> torch.Tensor:
    """True CFG: the pipeline calls the transformer for the prompt, then for the negative prompt."""
    generator = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 6, 16, generator=generator), torch.randn(2, 8, generator=generator)
    padding = torch.ones(2, 6)
    padding[:, 4:] = 0
    return pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], prompt_attention_mask=padding[:1],
                negative_prompt_embeds=embeds[1:], negative_pooled_prompt_embeds=pooled[1:],
                negative_prompt_attention_mask=padding[1:], true_cfg_scale=2.0, height=64, width=64, num_frames=9,
                num_inference_steps=steps, output_type="pt", generator=generator).frames


@pytest.fixture
def hunyuan_video():
    pipe = _hunyuan_video_pipeline()
    return pipe, _generate_hunyuan_video(pipe)


def test_hunyuan_video_pipeline_full_schedule_matches_the_uncompiled_pipeline(hunyuan_video):
    pipe, expected = hunyuan_video
    pipe.transformer = compile_hetcache(pipe.transformer, schedule="full")
    torch.testing.assert_close(_generate_hunyuan_video(pipe), expected, rtol=1e-4, atol=1e-4)
    assert {name: branch.steps["full"] for name, branch in hc.stats(pipe.transformer).branches.items()} == {
        "cond": 6, "uncond": 6}


def test_hunyuan_video_pipeline_with_an_edit_mask_runs_partial_and_reuse_steps_in_both_branches(hunyuan_video):
    pipe, expected = hunyuan_video
    edit = torch.zeros(3, 4, 4, dtype=torch.bool)
    edit[:, 1:3, 1:3] = True
    hc.set_mask(pipe.transformer, edit)
    pipe.transformer = compile_hetcache(pipe.transformer, schedule="FFPPRF")
    video = _generate_hunyuan_video(pipe)
    stats = hc.stats(pipe.transformer)
    for name in ("cond", "uncond"):
        assert stats.branches[name].history == ["full", "full", "partial", "partial", "reuse", "full"]
    assert torch.isfinite(video).all() and (video - expected).abs().max() < 0.5


def _ltx_video_pipeline():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=2, caption_channels=16).eval()
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1).eval()
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)


def _generate_ltx_video(pipe, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds, padding = torch.randn(2, 5, 16, generator=generator), torch.ones(2, 5)
    return pipe(prompt_embeds=embeds[:1], prompt_attention_mask=padding[:1], negative_prompt_embeds=embeds[1:],
                negative_prompt_attention_mask=padding[1:], height=32, width=32, num_frames=9, guidance_scale=3.0,
                max_sequence_length=5, num_inference_steps=steps, output_type="pt", generator=generator).frames


def test_ltx_video_pipeline_full_schedule_matches_and_a_token_grid_mask_gives_partial_and_reuse_steps():
    edit = torch.zeros(3, 8, 8, dtype=torch.bool)  # packed latents: 3 latent frames of 8 x 8 cells, one token each
    edit[:, 2:6, 2:6] = True
    _full_then_masked(_ltx_video_pipeline(), _generate_ltx_video, edit)


def _flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                        norm_num_groups=2, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.06, scaling_factor=0.3).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _generate_flux(pipe, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 5, 32, generator=generator), torch.randn(1, 32, generator=generator)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64, guidance_scale=3.5,
                num_inference_steps=steps, output_type="pt", generator=generator).images


IMAGE_EDIT = torch.zeros(4, 4, dtype=torch.bool)  # 64 x 64 pixels: 8 x 8 latent cells, packed 2 x 2 a token
IMAGE_EDIT[1:3, 1:3] = True


def test_flux_pipeline_full_schedule_matches_and_a_token_grid_mask_gives_partial_and_reuse_steps():
    _full_then_masked(_flux_pipeline(), _generate_flux, IMAGE_EDIT)


def _flux_fill_pipeline():
    from diffusers import FluxFillPipeline

    base = _flux_pipeline()
    torch.manual_seed(0)
    transformer = type(base.transformer)(
        patch_size=1, in_channels=16 + 16 + 256, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6)).eval()
    return FluxFillPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _generate_flux_fill(pipe, mask: torch.Tensor, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 5, 32, generator=generator), torch.randn(1, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    return pipe(image=image, mask_image=mask, prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                guidance_scale=30.0, num_inference_steps=steps, output_type="pt", generator=generator).images


def test_flux_fill_pipeline_reads_the_mask_image_like_vace_and_runs_partial_and_reuse_steps():
    """FluxFillPipeline folds ``mask_image`` into the transformer's input: no set_mask. Its full schedule equals
    the uncompiled pipeline; a fixed schedule runs partial steps over the masked tokens only."""
    pipe = _flux_fill_pipeline()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:32] = 1.0  # 2 x 1 of the 4 x 4 tokens (16 x 16 pixels each)
    expected = _generate_flux_fill(pipe, mask)
    transformer = pipe.transformer
    pipe.transformer = compile_hetcache(transformer, schedule="full")
    torch.testing.assert_close(_generate_flux_fill(pipe, mask), expected, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    pipe.transformer = compile_hetcache(transformer, schedule="FFPPRF", margin_radius=0, context_ratio=0.0,
                                        margin_ratio=0.0)
    image = _generate_flux_fill(pipe, mask)
    stats = hc.stats(pipe.transformer)
    assert stats.branches["cond"].history == ["full", "full", "partial", "partial", "reuse", "full"]
    assert stats.token_fraction == 2 / 16 and not stats.fallback_reasons
    assert "set_mask, else the inputs ('hidden_states')" in hc.explain(pipe.transformer)
    assert torch.isfinite(image).all() and (image - expected).abs().max() < 0.5


def _qwen_image_pipeline():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = _qwen_image_transformer()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def _qwen_image_transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()


def _generate_qwen_image(pipe, steps: int = 6) -> torch.Tensor:
    """True CFG (two sequential branches); the negative prompt's last 2 rows are padding."""
    generator = torch.Generator().manual_seed(0)
    embeds, masks = torch.randn(2, 6, 16, generator=generator), torch.ones(2, 6, dtype=torch.long)
    masks[1, 4:] = 0
    return pipe(prompt_embeds=embeds[:1], prompt_embeds_mask=masks[:1], negative_prompt_embeds=embeds[1:],
                negative_prompt_embeds_mask=masks[1:], true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=steps, output_type="pt", generator=generator).images


def test_qwen_image_pipeline_full_schedule_matches_and_a_token_grid_mask_gives_partial_and_reuse_steps():
    _full_then_masked(_qwen_image_pipeline(), _generate_qwen_image, IMAGE_EDIT, branches=("cond", "uncond"))


def _sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    vae = _flux_pipeline().vae
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4).eval()
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=transformer)


def _generate_sd3(pipe, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 8, generator=generator)
    return pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
                negative_pooled_prompt_embeds=pooled[1:], height=64, width=64, num_inference_steps=steps,
                guidance_scale=5.0, output_type="pt", generator=generator).images


def test_sd3_pipeline_runs_full_and_reuse_steps_and_says_why_not_partial_ones():
    """SD3's partial steps are refused (its family's limits say why); full steps equal the uncompiled pipeline
    and a fixed schedule's partial steps run as full ones (batched CFG: one branch)."""
    compiled = _full_then_masked(_sd3_pipeline(), _generate_sd3, None, schedule="FRPRRF",
                                 history=["full", "reuse", "full", "reuse", "reuse", "full"])
    assert "no partial variant" in hc.explain(compiled) and "[sd3: " in hc.explain(compiled)
