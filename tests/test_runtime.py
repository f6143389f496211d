"""Equivalence of the compiled variants with eager, branch separation and run lifecycle (aot_eager)."""

import logging

import pytest
import torch
from conftest import compile_hetcache, run

import hetcache_compile as hc


def test_full_step_equals_the_uncompiled_model(transformer, inputs):
    expected = run(transformer, inputs)
    compiled = compile_hetcache(transformer, schedule="full")
    torch.testing.assert_close(run(compiled, inputs), expected)
    torch.testing.assert_close(run(compiled, inputs, timestep=torch.tensor([300.0])),
                               run(transformer, inputs, timestep=torch.tensor([300.0])))


def test_reuse_right_after_full_with_identical_inputs_equals_full(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    full = run(compiled, inputs)
    reused = run(compiled, inputs)
    assert hc.stats(transformer).branches["cond"].history == ["full", "reuse"]
    # a reuse that re-added the VACE hints (diffusers FirstBlockCache's bug) would be far off
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


def test_reuse_runs_the_epilogue_on_the_new_timestep(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)
    reused = run(compiled, inputs, timestep=torch.tensor([450.0]))
    expected_epilogue_only = run(transformer, inputs, timestep=torch.tensor([450.0]))
    assert not torch.allclose(reused, run(transformer, inputs))  # the output head saw the new timestep
    assert torch.isfinite(reused).all() and reused.shape == expected_epilogue_only.shape


def test_cond_and_uncond_keep_separate_caches(transformer, inputs):
    uncond_text = torch.randn_like(inputs["encoder_hidden_states"])
    compiled = compile_hetcache(transformer, schedule="FR")
    cond_full = run(compiled, inputs)
    uncond_full = run(compiled, inputs, encoder_hidden_states=uncond_text)
    cond_reused = run(compiled, inputs)
    uncond_reused = run(compiled, inputs, encoder_hidden_states=uncond_text)
    torch.testing.assert_close(cond_reused, cond_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond_reused, uncond_full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond_full, uncond_full, atol=1e-3)
    stats = hc.stats(compiled)
    assert set(stats.branches) == {"cond", "uncond"}
    assert stats.steps == {"full": 2, "partial": 0, "reuse": 2}


def test_batched_cfg_is_one_branch_whose_cache_holds_both_samples(transformer):
    from models import transformer_inputs

    batched = transformer_inputs(batch=2)
    compiled = compile_hetcache(transformer, schedule="FR")
    full = run(compiled, batched)
    torch.testing.assert_close(run(compiled, batched), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, run(transformer, batched), rtol=1e-5, atol=1e-5)


def test_a_new_run_starts_when_the_timestep_goes_up(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    for t in (900.0, 700.0, 500.0, 999.0, 800.0):
        run(compiled, inputs, timestep=torch.tensor([t]))
    branch = hc.stats(compiled).branches["cond"]
    assert branch.history == ["full", "reuse"]  # the run that started at 999
    assert branch.runs == 2
    assert branch.steps == {"full": 2, "partial": 0, "reuse": 3}


def _denoise(compiled, inputs, steps: int) -> list[str]:
    """One run of ``steps`` calls at falling timesteps; the kinds the cond branch ran."""
    for t in torch.linspace(999, 100, steps):
        run(compiled, inputs, timestep=t.reshape(1))
    return hc.stats(compiled).branches["cond"].history


def test_the_last_call_is_full_once_a_run_showed_how_long_runs_are(transformer, inputs):
    compiled = compile_hetcache(transformer, preset="fast")
    first = list(_denoise(compiled, inputs, 4))
    second = list(_denoise(compiled, inputs, 4))
    assert first[-1] == "reuse" and second[-1] == "full"  # nobody said num_steps: learned from run 1
    assert second[:-1] == first[:-1]


def test_a_run_of_another_length_costs_at_most_one_full_step(transformer, inputs):
    compiled = compile_hetcache(transformer, preset="balanced")
    _denoise(compiled, inputs, 5)
    shorter = list(_denoise(compiled, inputs, 3))  # expected 5: ends without its final full step
    assert shorter == ["full", "reuse", "reuse"]
    longer = list(_denoise(compiled, inputs, 5))  # expected 3: a full step where the last run ended
    assert longer[2] == "full" and longer[-1] != "full"


def test_num_steps_wins_over_the_learned_run_length(transformer, inputs):
    compiled = compile_hetcache(transformer, preset="balanced", num_steps=4)
    _denoise(compiled, inputs, 5)
    assert _denoise(compiled, inputs, 5)[3] == "full"


def test_a_new_run_starts_when_the_control_video_changes(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)
    new_video = dict(inputs, control_hidden_states=torch.randn_like(inputs["control_hidden_states"]))
    out = run(compiled, new_video, timestep=torch.tensor([400.0]))
    assert hc.stats(compiled).branches["cond"].history == ["full"]
    torch.testing.assert_close(out, run(transformer, new_video, timestep=torch.tensor([400.0])))


def test_reset_forgets_the_caches(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)
    hc.reset(compiled)
    run(compiled, inputs, timestep=torch.tensor([400.0]))
    assert hc.stats(transformer).branches["cond"].history == ["full"]


def test_profiler_shows_the_step_kinds(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)  # compile outside the profiled region
    hc.reset(compiled)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(compiled, inputs)
        run(compiled, inputs)
    names = {event.name for event in prof.events()}
    assert {"hetcache::full", "hetcache::reuse"} <= names


def test_adaptive_schedule_reuses_and_stays_close(transformer, inputs):
    compiled = compile_hetcache(transformer, preset="fast")
    timesteps = torch.linspace(999, 0, 12)
    latents = inputs["hidden_states"]
    for t in timesteps:
        out = run(compiled, inputs, hidden_states=latents, timestep=t.reshape(1))
        assert torch.isfinite(out).all()
    stats = hc.stats(compiled)
    assert stats.steps["reuse"] > 0 and stats.steps["full"] >= 2
    assert stats.compile_counts["record"] == 1 and stats.compile_counts["reuse"] == 1
    assert stats.compile_counts["full"] == 0 and stats.compile_counts["partial"] <= 1


def test_explain_reports_the_analysis(transformer, inputs):
    compiled = compile_hetcache(transformer)
    run(compiled, inputs)
    text = hc.explain(compiled)
    assert "12 (6 self, 6 cross)" in text
    assert "vace_blocks x2, blocks x4" in text
    assert "timestep-embedding probe" in text


def test_max_branches_bounds_the_caches(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FR", max_branches=2)
    for _ in range(4):
        run(compiled, inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]))
    [instance] = hc.runtimes(transformer)[0].instances.values()
    assert len(instance.branches.live) == 2
    assert hc.stats(transformer).steps["full"] == 4


def test_first_order_reuse_extrapolates_the_residual_in_the_timestep():
    from hetcache_compile.config import HetCacheConfig
    from hetcache_compile.branches import BranchState
    from hetcache_compile.schedule import make_scheduler
    from hetcache_compile.stats import BranchStats

    r0, r1 = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    for order, expected in ((0, r1), (1, r1 + (r1 - r0) * 0.5)):
        state = BranchState(make_scheduler(HetCacheConfig()), BranchStats("cond"), reuse_order=order)
        for timestep, residual in ((900.0, r0), (800.0, r1)):
            state.last_timestep = timestep
            state.store(residual, None, [])
        state.last_timestep = 750.0
        torch.testing.assert_close(state.reuse_residual(), expected)


def test_first_order_reuse_changes_reuse_steps_only_once_two_steps_were_computed(transformer, inputs):
    later = [{"timestep": torch.tensor([t]), "hidden_states": torch.randn_like(inputs["hidden_states"])}
             for t in (1000.0, 900.0, 800.0)]
    outputs = {}
    for order in (0, 1):
        torch._dynamo.reset()
        compiled = compile_hetcache(transformer, schedule="FFR", reuse_order=order)
        outputs[order] = [run(compiled, inputs, **step) for step in later]
        assert hc.stats(transformer).branches["cond"].history == ["full", "full", "reuse"]
    torch.testing.assert_close(outputs[1][:2], outputs[0][:2])
    assert not torch.allclose(outputs[1][2], outputs[0][2])


def test_max_cache_bytes_lets_only_the_branches_that_fit_record(transformer, inputs, caplog):
    uncond = {"encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    unbounded = compile_hetcache(transformer, schedule="FP")
    run(unbounded, inputs)
    one_branch = hc.stats(transformer).cache_bytes  # residual, final hidden states, keys and values
    torch._dynamo.reset()
    bounded = compile_hetcache(transformer, schedule="FP", max_cache_bytes=int(1.5 * one_branch), budget_branches=1)
    with caplog.at_level(logging.WARNING, logger="hetcache_compile"):
        outputs = [run(bounded, inputs), run(bounded, inputs, **uncond),
                   run(bounded, inputs), run(bounded, inputs, **uncond)]
    branches = hc.stats(transformer).branches
    assert branches["cond"].history == ["full", "partial"]
    assert branches["uncond"].history == ["full", "full"]  # its caches would not fit beside cond's
    assert "max_cache_bytes" in caplog.text
    assert hc.stats(transformer).cache_bytes <= 1.5 * one_branch
    torch.testing.assert_close(outputs[3], run(transformer, inputs, **uncond), rtol=1e-4, atol=1e-4)


def test_max_cache_bytes_zero_means_step_level_caching_only(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FPR", max_cache_bytes=0)
    later = {"timestep": torch.tensor([400.0])}
    outputs = [run(compiled, inputs), run(compiled, inputs, **later), run(compiled, inputs, **later)]
    assert hc.stats(transformer).branches["cond"].history == ["full", "full", "reuse"]
    torch.testing.assert_close(outputs[1], run(transformer, inputs, **later), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_full_step_matches_eager(transformer, inputs, dtype):
    model = transformer.to(dtype)
    cast = {k: (v.to(dtype) if k != "timestep" else v) for k, v in inputs.items()}
    expected = run(model, cast)
    compiled = compile_hetcache(model, schedule="FR")
    torch.testing.assert_close(run(compiled, cast), expected)
    torch.testing.assert_close(run(compiled, cast), expected, rtol=2e-2, atol=2e-2)


def test_dump_env_var_writes_each_variant(transformer, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("HETCACHE_DUMP_GRAPHS", str(tmp_path))
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)
    run(compiled, inputs)
    wholes = sorted(p.name.split("_")[0] for p in tmp_path.iterdir() if "_piece_" not in p.name)
    assert wholes == ["full", "reuse"]
    assert "hetcache_residual" in next(p for p in tmp_path.glob("reuse_*") if "_piece_" not in p.name).read_text()
    assert list(tmp_path.glob("full_piece_*")) and list(tmp_path.glob("reuse_piece_*"))  # each piece compiled
