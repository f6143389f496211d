"""End-to-end tests with Inductor as the inner compiler (about a minute each on 2 CPU cores)."""

import pytest
import torch
from conftest import run

import hetcache_compile as hc


@pytest.mark.inductor
def test_inductor_full_and_reuse_steps_match_eager(transformer, inputs):
    compiled = torch.compile(transformer, backend="hetcache", options={"schedule": "FR"})
    full = run(compiled, inputs)
    torch.testing.assert_close(full, run(transformer, inputs), rtol=1e-4, atol=1e-4)
    reused = run(compiled, inputs)
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)
    hc.finish_compiling(transformer)  # Inductor compiles the pieces in the background while the steps run
    stats = hc.stats(transformer)
    assert stats.branches["cond"].history == ["full", "reuse"]
    assert stats.compile_counts == {"full": 1, "record": 0, "partial": 0, "reuse": 1}
    assert stats.compile_seconds["full"] > 0 and stats.compiled_pieces["full"] > 0
    torch.testing.assert_close(run(compiled, inputs), full, rtol=1e-4, atol=1e-4)  # compiled pieces now


@pytest.mark.inductor
def test_inductor_variants_at_a_second_resolution(transformer):
    """Dynamo's dynamic-shape recompile, specialized per shape, compiled by Inductor outside Dynamo."""
    from models import transformer_inputs

    compiled = torch.compile(transformer, backend="hetcache", options={"schedule": "FR"})
    for inputs in (transformer_inputs(), transformer_inputs(height=12)):
        full = run(compiled, inputs)
        torch.testing.assert_close(full, run(transformer, inputs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(run(compiled, inputs), full, rtol=1e-4, atol=1e-4)
    stats = hc.stats(transformer)
    assert stats.steps == {"full": 2, "partial": 0, "reuse": 2} and not stats.fallback_reasons


@pytest.mark.inductor
def test_inductor_partial_step_with_host_offloaded_caches_matches_eager(transformer, inputs):
    """The offload ops under Inductor: kept in order, the mutating wait reinplaced (no copy), exact."""
    options = {"schedule": "FP", "margin_radius": 0, "context_ratio": 0.0, "margin_ratio": 0.0,
               "cache_device": "cpu"}
    compiled = torch.compile(transformer, backend="hetcache", options=options)
    full = run(compiled, inputs)
    partial = run(compiled, inputs)  # same inputs: the cached context is exact
    stats = hc.stats(transformer)
    assert stats.branches["cond"].history == ["full", "partial"] and stats.host_cache_bytes > 0
    assert 0 < stats.token_fraction < 1
    torch.testing.assert_close(full, run(transformer, inputs), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-4)
