"""What a new user meets: other model families, options, masks, statistics and refusal reasons."""

import warnings

import pytest
import torch
from conftest import compile_hetcache, run
from models import tiny_vace_transformer, transformer_inputs

import hetcache_compile as hc


def test_token_count_equal_to_the_hidden_size_keeps_partial_steps(transformer, capfd):
    inputs = transformer_inputs(height=8, width=4)  # 3 x 4 x 2 = 24 tokens, and dim 24
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=1, context_ratio=0.5)
    run(compiled, inputs)
    run(compiled, inputs)
    report = hc.explain(transformer)
    assert "timestep_proj" not in report.split("token inputs")[1]  # [1, 6, 24]: no token axis
    assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
    assert "Traceback" not in capfd.readouterr().err


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4).eval()


def test_a_joint_attention_model_finds_its_timestep_and_its_cfg_branches():
    model = tiny_sd3()
    cond = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                pooled_projections=torch.randn(1, 8))
    uncond = dict(cond, encoder_hidden_states=torch.zeros(1, 5, 16), pooled_projections=torch.zeros(1, 8))
    compiled = compile_hetcache(model, schedule="FR")
    for t in (900.0, 800.0):
        for branch in (cond, uncond):
            compiled(**branch, timestep=torch.tensor([t]))
    stats = hc.stats(model)
    assert {name: b.history for name, b in stats.branches.items()} == {"cond": ["full", "reuse"],
                                                                       "uncond": ["full", "reuse"]}
    expected = model(**cond, timestep=torch.tensor([700.0]), return_dict=False)[0]
    hc.reset(model)
    torch.testing.assert_close(compiled(**cond, timestep=torch.tensor([700.0]), return_dict=False)[0], expected)


def test_a_model_without_timestep_never_reuses_across_calls():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=50, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    compiled = compile_hetcache(model, schedule="FR")
    first, second = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 7))
    with pytest.warns(UserWarning, match="no timestep input found"):
        compiled(input_ids=first)
    out = compiled(input_ids=second).last_hidden_state
    torch.testing.assert_close(out, model(input_ids=second).last_hidden_state)
    assert "no timestep input found" in hc.stats(model).fallback_reason


def test_bad_options_raise_value_error_at_the_first_call(transformer, inputs):
    compiled = torch.compile(transformer, backend="hetcache", options={"preset": "fastest"})
    with pytest.raises(ValueError, match="option 'preset' got 'fastest'"):
        run(compiled, inputs)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="unknown option 'thresold'"):
        run(torch.compile(transformer, backend="hetcache", options={"thresold": 1}), inputs)


def test_inductor_mode_is_taken_and_cuda_graph_modes_are_refused(transformer, inputs):
    from hetcache_compile.compile_jobs import inner_compiler

    config = hc.HetCacheConfig.from_options(None, mode="max-autotune-no-cudagraphs")
    assert config.mode == "max-autotune-no-cudagraphs"
    assert hc.HetCacheConfig.from_options({"mode": "default", "inductor_options": {"max_autotune": True}})
    assert callable(inner_compiler(config))
    compiled = torch.compile(transformer, backend="hetcache", mode="reduce-overhead")
    with pytest.raises(ValueError, match="CUDA graphs.*max-autotune-no-cudagraphs"):
        run(compiled, inputs)


def test_a_soft_mask_is_cut_at_one_half_in_every_form_with_a_warning(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=0, context_ratio=0.0, size_buckets=0)
    soft = torch.full((3, 4, 4), 0.05)
    soft[0, 0, :2] = 1.0
    hc.set_mask(transformer, soft)
    with pytest.warns(UserWarning, match="not binary .* values above 0.5 count as edited"):
        run(compiled, inputs)
    run(compiled, inputs)
    assert hc.stats(transformer).branches["cond"].token_fractions == [2 / 48]
    pixels = torch.full((9, 64, 64), 0.05)  # the same rule for a pixel mask video
    with pytest.warns(UserWarning, match="not binary"):
        hc.set_mask(transformer, pixels)


def test_stats_count_model_calls_when_graph_breaks_split_the_model(transformer, inputs):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.2))
    compiled = compile_hetcache(transformer, schedule="full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (900.0, 800.0, 700.0):
            with transformer.cache_context("cond"):
                run(compiled, inputs, timestep=torch.tensor([t]))
    stats = hc.stats(transformer)
    assert stats.graphs > 1 and stats.graph_calls > 3
    assert stats.calls == 3 and sum(stats.steps.values()) == 3


def test_refusal_reasons_are_the_same_in_every_compile():
    from test_fallback import LeakyStack

    reasons = []
    for _ in range(2):
        model = LeakyStack().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile_hetcache(model, schedule="FR")(torch.randn(1, 6, 16))
        reasons.append(hc.stats(model).fallback_reason)
        torch._dynamo.reset()
    assert reasons[0] == reasons[1]
    assert "_" not in reasons[0].split(" inside")[0]  # names 'add in blocks.0', not 'add_3'


def test_two_instances_at_two_resolutions_in_one_process():
    a, b = tiny_vace_transformer(seed=0), tiny_vace_transformer(seed=1)
    compiled_a, compiled_b = compile_hetcache(a, schedule="FPR"), compile_hetcache(b, schedule="FPR")
    small, tall = transformer_inputs(), transformer_inputs(height=12)
    for model, inputs in ((compiled_a, small), (compiled_b, tall), (compiled_a, tall), (compiled_b, small)):
        run(model, inputs)
    torch.testing.assert_close(run(compiled_b, small, timestep=torch.tensor([999.0])),
                               run(b, small, timestep=torch.tensor([999.0])))
    assert not hc.stats(a).fallback_reasons and not hc.stats(b).fallback_reasons
