"""End-to-end runs of diffusers' real WanVACEPipeline with the transformer compiled by hetcache."""

import torch
from models import edit_inputs, tiny_vace_pipeline

import hetcache_compile as hc
from hetcache_compile.backend import hetcache_backend


def generate(pipe, steps, **kwargs):
    return pipe(**edit_inputs(), num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_full_schedule_matches_the_uncompiled_pipeline():
    pipe = tiny_vace_pipeline()
    expected = generate(pipe, steps=5)
    pipe.transformer = torch.compile(pipe.transformer, backend="hetcache",
                                     options={"schedule": "full", "inner_backend": "aot_eager"})
    torch.testing.assert_close(generate(pipe, steps=5), expected, rtol=1e-4, atol=1e-4)
    stats = hc.stats(pipe.transformer)
    assert stats.branches["cond"].steps["full"] == 5 and stats.branches["uncond"].steps["full"] == 5


def test_twenty_steps_make_one_graph_and_compile_each_variant_once():
    pipe = tiny_vace_pipeline()
    backend_calls = []

    def counting_backend(gm, example_inputs):
        backend_calls.append(gm)
        return hetcache_backend(gm, example_inputs, options={"schedule": "FFRFR", "inner_backend": "aot_eager"})

    pipe.transformer = torch.compile(pipe.transformer, backend=counting_backend)
    video = generate(pipe, steps=20)
    assert torch.isfinite(video).all()
    assert len(backend_calls) == 1, "Dynamo recompiled"
    stats = hc.stats(pipe.transformer)
    assert stats.compile_counts == {"full": 1, "record": 0, "partial": 0, "reuse": 1}
    assert stats.branches["cond"].history == ["full", "full", "reuse", "full"] + ["reuse"] * 16
    assert stats.steps["full"] == 2 * 3 and stats.steps["reuse"] == 2 * 17


def test_in_place_module_compile_and_a_second_video_reset_themselves():
    pipe = tiny_vace_pipeline()
    pipe.transformer.compile(backend="hetcache", options={"schedule": "FR", "inner_backend": "aot_eager"})
    generate(pipe, steps=4)
    generate(pipe, steps=4)
    branch = hc.stats(pipe.transformer).branches["cond"]
    assert branch.runs == 2
    assert branch.history == ["full", "reuse", "reuse", "reuse"]


def test_wan22_two_experts_keep_their_own_state_in_the_real_pipeline():
    """Wan 2.2: ``transformer`` above the boundary timestep, ``transformer_2`` below it; one class, so
    Dynamo shares the graph, and each expert must still run on its own caches."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from models import tiny_vae

    def expert(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32).eval()

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=5.0), transformer=expert(0), transformer_2=expert(1), boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    text = torch.Generator().manual_seed(3)
    call = dict(prompt_embeds=torch.randn(1, 5, 32, generator=text), height=32, width=32, num_frames=5,
                negative_prompt_embeds=torch.randn(1, 5, 32, generator=text), num_inference_steps=6,
                output_type="pt")

    def generate_video():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).frames

    expected = generate_video()
    options = {"schedule": "full", "inner_backend": "aot_eager"}
    pipe.transformer = torch.compile(pipe.transformer, backend="hetcache", options=options)
    pipe.transformer_2 = torch.compile(pipe.transformer_2, backend="hetcache", options=options)
    torch.testing.assert_close(generate_video(), expected, rtol=1e-4, atol=1e-4)
    high, low = hc.stats(pipe.transformer), hc.stats(pipe.transformer_2)
    assert high.calls + low.calls == 2 * 6 and high.calls > 0 and low.calls > 0
    torch._dynamo.reset()
    options["schedule"] = "FR"
    pipe.transformer = torch.compile(pipe.transformer._orig_mod, backend="hetcache", options=options)
    pipe.transformer_2 = torch.compile(pipe.transformer_2._orig_mod, backend="hetcache", options=options)
    generate_video()
    for model in (pipe.transformer, pipe.transformer_2):  # each expert starts with a full step of its own
        assert hc.stats(model).branches["cond"].history[0] == "full"
        assert hc.stats(model).branches["cond"].history[1:] == ["reuse"] * (hc.stats(model).calls // 2 - 1)
