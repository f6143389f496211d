"""Cache plans: how the partial steps' keys and values are stored (``cache_dtype``) (aot_eager)."""

import pytest
import torch
from conftest import compile_hetcache, run

import hetcache_compile as hc
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
    _, _, default_bytes = _full_then_partial(transformer, inputs)
    default_kv = _key_value_bytes(transformer)
    torch._dynamo.reset()
    full, partial, recorded = _full_then_partial(transformer, inputs, cache_dtype=cache_dtype)
    torch.testing.assert_close(partial, full, rtol=0, atol=atol)
    assert _key_value_bytes(transformer) == pytest.approx(share * default_kv, rel=1e-6)
    assert recorded < default_bytes


def test_float8_caches_hold_float8_data_and_a_scale_per_token_and_head(transformer, inputs):
    _full_then_partial(transformer, inputs, cache_dtype="float8_e4m3fn")
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


def test_cache_dtype_is_refused_with_attention_pruning_and_unknown_types():
    with pytest.raises(hc.HetCacheOptionsError, match="cache_dtype"):
        hc.HetCacheConfig.from_options({"cache_dtype": "float8_e4m3fn", "prune": "attention"})
    with pytest.raises(hc.HetCacheOptionsError, match="cache_dtype"):
        hc.HetCacheConfig.from_options({"cache_dtype": "int8"})
    assert hc.HetCacheConfig.from_options({"cache_dtype": torch.bfloat16}).cache_dtype == "bfloat16"
