"""Cache plans: how the partial steps' keys and values are stored (``cache_dtype``) (aot_eager)."""

import logging

import pytest
import torch
from conftest import compile_hetcache, run

import hetcache_compile as hc
from hetcache_compile.budget import PLAN_ORDER, candidate_plans
from hetcache_compile.passes.cache_codec import CacheCodec

PARTIAL = {"schedule": "FP", "margin_radius": 1, "context_ratio": 0.25, "margin_ratio": 0.5}


def _full_then_partial(model, inputs, **options):
    compiled = compile_hetcache(model, **PARTIAL, **options)
    full = run(compiled, inputs)
    recorded = hc.stats(model).cache_bytes
    partial = run(compiled, inputs)
    assert hc.stats(model).branches["cond"].history == ["full", "partial"]
    return full, partial, recorded


def _key_value_bytes(model) -> int:
    """Bytes of the per-site key/value caches a full step recorded (scales included)."""
    [runtime] = hc.runtimes(model)
    [instance] = runtime.instances.values()
    [branch] = instance.branches.live.values()
    return sum(t.numel() * t.element_size() for t in branch.site_caches)


@pytest.mark.parametrize("cache_dtype, atol, share", [
    ("float16", 1e-4, 0.5),  # the tiny model computes in float32: half the bytes
    ("bfloat16", 1e-3, 0.5),
    ("float8_e4m3fn", 1e-2, 0.25 + 4 / 12 / 4),  # 1 byte a value, and a float32 scale per 12-value row
])
def test_narrow_caches_keep_the_partial_step_close_to_full_for_fewer_bytes(transformer, inputs, cache_dtype, atol,
                                                                            share):
    _, _, default_bytes = _full_then_partial(transformer, inputs, recompute_kv=False)
    default_kv = _key_value_bytes(transformer)
    torch._dynamo.reset()
    full, partial, recorded = _full_then_partial(transformer, inputs, cache_dtype=cache_dtype, recompute_kv=False)
    torch.testing.assert_close(partial, full, rtol=0, atol=atol)
    assert _key_value_bytes(transformer) == pytest.approx(share * default_kv, rel=1e-6)
    assert recorded < default_bytes


def _later(inputs):
    noise = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    return {"timestep": torch.tensor([400.0]), "hidden_states": noise}


@pytest.mark.parametrize("cache_dtype", [None, "float8_e4m3fn"])
def test_recomputed_keys_and_values_equal_stored_ones_for_half_the_cache(transformer, inputs, cache_dtype):
    outputs, kv_bytes = {}, {}
    for recompute in (False, True):
        torch._dynamo.reset()
        compiled = compile_hetcache(transformer, **PARTIAL, cache_dtype=cache_dtype, recompute_kv=recompute)
        run(compiled, inputs)
        kv_bytes[recompute] = _key_value_bytes(transformer)
        outputs[recompute] = run(compiled, inputs, **_later(inputs))
        assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
    [runtime] = hc.runtimes(transformer)
    linears = [n for n in runtime.partial.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert runtime.recompute and len(linears) >= 6 * 2 + 6 * 3  # per site: q, k, v of S, and k, v of the context
    atol = 1e-5 if cache_dtype is None else 2e-2  # float8: the projection input is what is rounded now
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=atol)
    # float8 bytes a token: x's 24 values + one scale, against K's and V's 24 values + a scale per head (2) each
    share = 0.5 if cache_dtype is None else (24 + 4) / (2 * (24 + 2 * 4))
    assert kv_bytes[True] == pytest.approx(share * kv_bytes[False], rel=1e-6)


def test_the_default_plan_recomputes_keys_and_values_and_storing_them_is_an_option(transformer, inputs):
    """recompute_kv=None: recomputed wherever the graph allows it (half the bytes, the same output);
    recompute_kv=False stores keys and values as computed."""
    outputs, kv_bytes, plans = {}, {}, {}
    for option in (None, False):
        torch._dynamo.reset()
        compiled = compile_hetcache(transformer, **PARTIAL, recompute_kv=option)
        run(compiled, inputs)
        kv_bytes[option] = _key_value_bytes(transformer)
        outputs[option] = run(compiled, inputs, **_later(inputs))
        assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
        [runtime] = hc.runtimes(transformer)
        plans[option] = runtime.plan.name
        assert f"cache plan: {runtime.plan.name}" in hc.explain(compiled)
    assert plans == {None: "as computed, keys/values recomputed", False: "as computed"}
    assert kv_bytes[None] == kv_bytes[False] // 2
    torch.testing.assert_close(outputs[None], outputs[False], rtol=0, atol=1e-5)


def test_recompute_matches_eager_with_every_token_computed_but_one_frame(transformer, inputs):
    """Context rows at the clip's start and end: RoPE must be gathered at the context positions."""
    compiled = compile_hetcache(transformer, schedule="FP", recompute_kv=True, context_ratio=0.0, margin_ratio=0.0,
                                margin_radius=0)
    run(compiled, inputs)
    partial = run(compiled, inputs)  # identical inputs: the cached context is exact, recomputed or not
    assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
    assert hc.stats(transformer).token_fraction < 1
    torch.testing.assert_close(partial, run(transformer, inputs), rtol=1e-4, atol=1e-4)


def test_float8_caches_hold_float8_data_and_a_scale_per_token_and_head(transformer, inputs):
    _full_then_partial(transformer, inputs, cache_dtype="float8_e4m3fn", recompute_kv=False)
    [runtime] = hc.runtimes(transformer)
    names = [n.name for n in runtime.partial.gm.graph.nodes if n.op == "placeholder"]
    assert names[-4:] == ["hetcache_k5", "hetcache_k5_scale", "hetcache_v5", "hetcache_v5_scale"]
    [instance] = runtime.instances.values()
    [branch] = instance.branches.live.values()
    data, scale = branch.site_caches[:2]
    assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (*data.shape[:-1], 1)


def test_codec_round_trip_error_is_bounded_per_row():
    x = torch.randn(2, 3, 50, 16) * torch.logspace(-3, 3, 50)[:, None]  # rows of very different scales
    for dtype, bound in ((torch.float8_e4m3fn, 2 ** -4), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)):
        codec = CacheCodec(dtype)
        decoded = codec.decode_tensor(*codec.encode_tensor(x), x.dtype)
        relative = (decoded - x).abs() / x.abs().amax(-1, keepdim=True)
        assert relative.max() <= bound, dtype


def test_cache_plans_are_refused_with_attention_pruning_and_unknown_types():
    with pytest.raises(hc.HetCacheOptionsError, match="cache_dtype"):
        hc.HetCacheConfig.from_options({"cache_dtype": "float8_e4m3fn", "prune": "attention"})
    with pytest.raises(hc.HetCacheOptionsError, match="recompute_kv"):
        hc.HetCacheConfig.from_options({"recompute_kv": True, "prune": "attention"})
    with pytest.raises(hc.HetCacheOptionsError, match="cache_dtype"):
        hc.HetCacheConfig.from_options({"cache_dtype": "int8"})
    assert hc.HetCacheConfig.from_options({"cache_dtype": torch.bfloat16}).cache_dtype == "bfloat16"


STEPS = ({}, {"timestep": torch.tensor([400.0])}, {"timestep": torch.tensor([300.0])})
FULL_PARTIAL_FULL = dict(PARTIAL, schedule="FPF")  # the second full step holds the most (slope, query, key)


_PEAKS: dict = {}  # the tiny model's peaks depend on its shapes only: measured once per session


def _peak_bytes_by_plan(transformer, inputs) -> dict:
    """The most one branch holds over a full, partial, full run, per plan (measured, not computed)."""
    if _PEAKS:
        return _PEAKS
    for cache_dtype, recompute in PLAN_ORDER:
        torch._dynamo.reset()
        compiled = compile_hetcache(transformer, **FULL_PARTIAL_FULL, cache_dtype=cache_dtype, recompute_kv=recompute)
        peak = 0
        for step in STEPS:
            run(compiled, inputs, **step)
            peak = max(peak, hc.stats(transformer).cache_bytes)
        _PEAKS[cache_dtype, recompute] = peak
    torch._dynamo.reset()
    return _PEAKS


@pytest.mark.parametrize("target, options", [
    ((None, True), {}), (("bfloat16", True), {}), (("float8_e4m3fn", True), {}),
    (("bfloat16", False), {"recompute_kv": False}),  # storing keys and values walks the types alone
])
def test_the_budget_picks_the_most_accurate_plan_that_fits_and_holds_at_every_call(transformer, inputs, target,
                                                                                  options):
    peaks = _peak_bytes_by_plan(transformer, inputs)
    limit = 2 * peaks[target] + 16  # two CFG branches of the target plan
    # the tiny model's keys are a projection: where recomputing is open, the stored plans (more bytes) are skipped
    order = [plan for plan in candidate_plans(hc.HetCacheConfig.from_options(options)) if plan[1] == target[1]]
    expected = next(plan for plan in order if 2 * peaks[plan] <= limit)  # an earlier plan may fit as well
    uncond = {"encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    compiled = compile_hetcache(transformer, **FULL_PARTIAL_FULL, **options, max_cache_bytes=limit)
    for step in STEPS:
        for branch in ({}, uncond):
            run(compiled, inputs, **step, **branch)
            assert hc.stats(transformer).cache_bytes <= limit
    [runtime] = hc.runtimes(transformer)
    assert (runtime.plan.cache_dtype, runtime.plan.recompute) == expected and runtime.plan.fits
    assert f"cache plan: {runtime.plan.name}" in hc.explain(compiled)
    for branch in hc.stats(transformer).branches.values():
        assert branch.history == ["full", "partial", "full"]


def test_a_budget_below_every_plan_keeps_full_and_reuse_steps_and_says_so_once(transformer, inputs, caplog):
    smallest = min(_peak_bytes_by_plan(transformer, inputs).values())
    compiled = compile_hetcache(transformer, schedule="FPR", max_cache_bytes=smallest - 1)
    later = {"timestep": torch.tensor([400.0])}
    with caplog.at_level(logging.WARNING, logger="hetcache_compile"):
        outputs = [run(compiled, inputs), run(compiled, inputs, **later), run(compiled, inputs, **later)]
    assert hc.stats(transformer).branches["cond"].history == ["full", "full", "reuse"]
    assert caplog.text.count("do not fit") == 1
    assert hc.stats(transformer).cache_bytes < smallest
    torch.testing.assert_close(outputs[1], run(transformer, inputs, **later), rtol=1e-4, atol=1e-4)
