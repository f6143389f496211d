"""Partial steps: equivalence, real token pruning, masks and their failure modes (aot_eager)."""

import logging

import pytest
import torch
from conftest import compile_hetcache, run
from models import box_mask, transformer_inputs, vace_control

import hetcache_compile as hc


def attention_shapes(fn):
    """(queries, keys) of every attention kernel ``fn()`` runs, read from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
    kernels = [e for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    return [(e.input_shapes[0][-2], e.input_shapes[1][-2]) for e in kernels]


ALL_TOKENS = {"context_ratio": 1.0, "margin_ratio": 1.0}


def test_partial_with_every_token_equals_full_on_new_inputs(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", **ALL_TOKENS)
    run(compiled, inputs)
    later = {"timestep": torch.tensor([400.0]), "hidden_states": torch.randn_like(inputs["hidden_states"])}
    partial = run(compiled, inputs, **later)
    assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
    torch.testing.assert_close(partial, run(transformer, inputs, **later), rtol=1e-4, atol=1e-4)
    assert hc.stats(transformer).token_fraction == 1.0


def test_partial_right_after_full_with_identical_inputs_equals_full(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=1, context_ratio=0.25, margin_ratio=0.5)
    full = run(compiled, inputs)
    partial = run(compiled, inputs)
    fraction = hc.stats(transformer).token_fraction
    assert 0 < fraction < 0.6
    torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-4)


def test_partial_attention_takes_only_the_selected_queries(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", inner_backend="eager", margin_radius=1,
                                context_ratio=0.25, margin_ratio=0.5)
    run(compiled, inputs)  # compile outside the profiled calls
    run(compiled, inputs, timestep=torch.tensor([400.0]))
    hc.reset(compiled)
    full_calls = attention_shapes(lambda: run(compiled, inputs))
    partial_calls = attention_shapes(lambda: run(compiled, inputs, timestep=torch.tensor([400.0])))
    selected = round(hc.stats(transformer).branches["cond"].token_fractions[-1] * 48)
    assert selected < 48
    assert full_calls == [(48, 48), (48, 5)] * 6
    assert partial_calls == [(selected, 48), (selected, 5)] * 6  # queries |S|; self-attention keys all N


def test_selection_is_deterministic(transformer, inputs):
    picks = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = compile_hetcache(transformer, schedule="FP", margin_radius=1, context_ratio=0.3)
        run(compiled, inputs)
        run(compiled, inputs, timestep=torch.tensor([400.0]))  # the first partial step chooses S
        [selection] = [state.selection for runtime in hc.runtimes(transformer) for instance in
                       runtime.instances.values() for state in instance.branches.live.values()
                       if state.selection is not None]
        picks.append(selection.clone())
        hc.reset(transformer)
    torch.testing.assert_close(picks[0], picks[1])
    generative = {5, 6, 9, 10}
    assert generative <= {int(i) % 16 for i in picks[0]}


def test_empty_mask_means_no_partial_steps(transformer, caplog):
    inputs = transformer_inputs()
    inputs["control_hidden_states"] = vace_control(torch.zeros(1, 3, 8, 8))
    compiled = compile_hetcache(transformer, schedule="FP")
    with caplog.at_level(logging.WARNING, logger="hetcache_compile"):
        out = [run(compiled, inputs, timestep=torch.tensor([t])) for t in (500.0, 400.0, 300.0)]
    assert hc.stats(transformer).branches["cond"].history == ["full", "full", "full"]
    assert sum("empty mask" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(out[-1], run(transformer, inputs, timestep=torch.tensor([300.0])))


def test_full_mask_makes_every_token_generative(transformer):
    inputs = transformer_inputs()
    inputs["control_hidden_states"] = vace_control(torch.ones(1, 3, 8, 8))
    compiled = compile_hetcache(transformer, schedule="FP", context_ratio=0.0, margin_ratio=0.0)
    run(compiled, inputs)
    out = run(compiled, inputs, timestep=torch.tensor([400.0]))
    assert hc.stats(transformer).token_fraction == 1.0
    torch.testing.assert_close(out, run(transformer, inputs, timestep=torch.tensor([400.0])), rtol=1e-4, atol=1e-4)


def test_set_mask_overrides_and_a_bad_shape_names_the_expected_grid(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=0, context_ratio=0.0, size_buckets=0)
    token_mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    token_mask[:, 0, 0] = True
    hc.set_mask(compiled, token_mask)
    run(compiled, inputs)
    run(compiled, inputs, timestep=torch.tensor([400.0]))
    assert hc.stats(transformer).token_fraction == 3 / 48
    with pytest.raises(ValueError, match=r"token grid \[F', H', W'\] = \[3, 4, 4\].*\[9, 64, 64\]"):
        hc.set_mask(compiled, torch.zeros(3, 5, 4, dtype=torch.bool))
    hc.set_mask(compiled, None)


def test_pixel_mask_video_maps_to_tokens():
    from hetcache_compile.priors import mask_to_token_grid

    pixels = torch.zeros(9, 64, 64)
    pixels[5, 17, 40] = 1.0  # pixel frame 5 -> latent frame 2 (frames 1-4 -> 1, 5-8 -> 2)
    tokens = mask_to_token_grid(pixels, grid=(3, 4, 4), patch=(1, 2, 2))
    assert tokens.shape == (1, 3, 4, 4)
    assert tokens.nonzero().tolist() == [[0, 2, 1, 2]]


def test_batch_with_per_sample_masks_uses_their_union(transformer):
    inputs = transformer_inputs(batch=2)
    masks = torch.cat([box_mask(box=(0, 2, 0, 2)), box_mask(box=(6, 8, 6, 8))])
    inputs["control_hidden_states"] = vace_control(masks)
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=0, context_ratio=0.0)
    full = run(compiled, inputs)
    partial = run(compiled, inputs)
    assert hc.stats(transformer).token_fraction == 6 / 48
    torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size_buckets, symbolic, fractions, compiles", [
    (0, True, [3 / 48, 12 / 48], 1),  # |S| a symbol (Inductor's default): one compilation for every mask
    (0, False, [3 / 48, 12 / 48], 2),  # static sizes (aot_eager's default): one per |S|
    (4, False, [12 / 48, 12 / 48], 1),  # static, in buckets of 12 tokens: 3 rounds up to 12
])
def test_a_new_video_with_another_mask_reuses_a_compiled_partial_variant(transformer, size_buckets, symbolic,
                                                                         fractions, compiles):
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=0, context_ratio=0.0,
                                size_buckets=size_buckets, symbolic_sizes=symbolic)
    for box in ((0, 2, 0, 2), (0, 4, 0, 4)):  # 3 then 12 generative tokens per video
        inputs = transformer_inputs()
        inputs["control_hidden_states"] = vace_control(box_mask(box=box))
        run(compiled, inputs)
        out = run(compiled, inputs)
        torch.testing.assert_close(out, run(transformer, inputs), rtol=1e-4, atol=1e-4)
    stats = hc.stats(transformer)
    assert stats.branches["cond"].token_fractions == fractions
    assert stats.compile_counts["partial"] == compiles


@pytest.mark.parametrize("prune", ["block", "attention"])
def test_pipeline_default_preset_uses_every_step_kind(prune):
    from models import edit_inputs, tiny_vace_pipeline

    pipe = tiny_vace_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="hetcache",
                                     options={"inner_backend": "aot_eager", "prune": prune})
    video = pipe(**edit_inputs(), num_inference_steps=16, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(video).all()
    stats = hc.stats(pipe.transformer)
    steps = stats.steps
    assert steps["full"] > 0 and steps["partial"] > 0 and steps["reuse"] > 0, steps
    assert stats.compile_counts["partial"] == 1 and stats.compile_counts["record"] == 1  # no recompiles
    assert stats.graphs == 1 and 0 < stats.token_fraction < 1 and stats.cache_bytes > 0


def test_profiler_shows_partial_steps_and_selection(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=1, context_ratio=0.25)
    run(compiled, inputs)
    run(compiled, inputs)  # compile both variants outside the profiled region
    hc.reset(compiled)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(compiled, inputs)
        run(compiled, inputs)
    names = {event.name for event in prof.events()}
    assert {"hetcache::full", "hetcache::select", "hetcache::partial"} <= names
