"""Every resolution is rewritten, whatever Dynamo does with shapes, and outputs do not depend on history."""

import pytest
import torch
from conftest import compile_hetcache, run
from models import transformer_inputs

import hetcache_compile as hc

TIMESTEPS = (900.0, 700.0, 500.0, 300.0)


def denoise(model, inputs):
    return [run(model, inputs, timestep=torch.tensor([t])) for t in TIMESTEPS]


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_second_resolution_keeps_every_step_kind_and_history_does_not_matter(transformer, dynamic):
    small, tall = transformer_inputs(), transformer_inputs(height=12, frames=2)
    compiled = torch.compile(transformer, backend="hetcache", dynamic=dynamic,
                             options={"schedule": "FPR", "inner_backend": "aot_eager"})
    first = denoise(compiled, small)
    other = denoise(compiled, tall)
    again = denoise(compiled, small)
    for x, y in zip(first, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    stats = hc.stats(transformer)
    assert not stats.fallback_reasons
    assert stats.steps == {"full": 3, "partial": 3, "reuse": 6}
    assert stats.calls == 12
    torch._dynamo.reset()
    fresh = denoise(compile_hetcache(transformer, schedule="FPR"), tall)  # what a new process computes
    for x, y in zip(other, fresh):
        torch.testing.assert_close(x, y)


def test_full_steps_at_every_resolution_equal_eager_under_dynamic_shapes(transformer):
    compiled = torch.compile(transformer, backend="hetcache", dynamic=True,
                             options={"schedule": "full", "inner_backend": "aot_eager"})
    for shape in ({}, {"height": 12}, {"frames": 5, "width": 4}):
        inputs = transformer_inputs(**shape)
        torch.testing.assert_close(run(compiled, inputs), run(transformer, inputs))
    assert "partial steps: token grid [5, 4, 2]" in hc.explain(transformer)


def test_specialized_shapes_are_bounded():
    import warnings

    from test_fallback import LeakyStack

    from hetcache_compile.shapes import RetiredStats

    model = LeakyStack().eval()  # refused at every shape: cheap to compile, same bookkeeping
    compiled = torch.compile(model, backend="hetcache", dynamic=True,
                             options={"schedule": "FR", "inner_backend": "eager", "max_shapes": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tokens in (6, 7, 8, 6):
            x = torch.randn(1, tokens, 16)
            torch.testing.assert_close(compiled(x), model(x))
            live = [rt for rt in hc.runtimes(model) if not isinstance(rt, RetiredStats)]
            assert len(live) <= 2  # the least recently used shape is dropped
    assert hc.stats(model).calls == 4  # dropped shapes' calls are still counted
