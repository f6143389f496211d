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
