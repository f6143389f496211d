"""LoRA adapters added, switched, scaled and disabled after compiling: outputs equal eager's."""

import pytest
import torch
from conftest import compile_hetcache, run
from models import add_lora

import hetcache_compile as hc

pytest.importorskip("peft")


def test_adapters_changed_after_compiling_match_eager(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="full")
    torch.testing.assert_close(run(compiled, inputs), run(transformer, inputs))
    steps = [
        ("add adapter a", lambda: add_lora(transformer, "a", seed=1)),
        ("scale a to 0.5", lambda: transformer.set_adapters(["a"], weights=[0.5])),
        ("add adapter b", lambda: add_lora(transformer, "b", seed=2)),
        ("switch to b", lambda: transformer.set_adapters(["b"], weights=[1.0])),
        ("mix a and b", lambda: transformer.set_adapters(["a", "b"], weights=[0.3, 0.7])),
        ("disable", lambda: transformer.disable_lora()),
        ("enable", lambda: transformer.enable_lora()),
    ]
    outputs = []
    for what, change in steps:
        change()
        out = run(compiled, inputs)
        torch.testing.assert_close(out, run(transformer, inputs), msg=lambda m, what=what: f"after '{what}': {m}")
        outputs.append(out)
    assert not torch.allclose(outputs[0], outputs[1])  # the adapters really changed the output
    assert not hc.stats(transformer).fallback_reasons


def test_a_new_adapter_scale_starts_a_new_run(transformer, inputs):
    add_lora(transformer, "a", seed=1)
    compiled = compile_hetcache(transformer, schedule="FR")
    run(compiled, inputs)
    transformer.set_adapters(["a"], weights=[0.5])
    out = run(compiled, inputs, timestep=torch.tensor([400.0]))  # would be a reuse step within one run
    torch.testing.assert_close(out, run(transformer, inputs, timestep=torch.tensor([400.0])))
    assert hc.stats(transformer).steps["reuse"] == 0  # (the new scale may also recompile: a second graph)


@pytest.mark.parametrize("recompute_kv", [None, False], ids=["recomputed", "stored"])
def test_a_partial_step_under_an_adapter_recomputes_the_context_keys_through_it(transformer, inputs, recompute_kv):
    """The same inputs twice: the partial step's context keys and values, recomputed (by default) from the
    cached projection input through the adapted projections, or stored, equal eager's."""
    add_lora(transformer, "a", seed=1)
    transformer.set_adapters(["a"], weights=[0.7])
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=1, context_ratio=0.0, margin_ratio=0.0,
                                recompute_kv=recompute_kv)
    run(compiled, inputs)
    partial = run(compiled, inputs)
    assert hc.stats(transformer).branches["cond"].history == ["full", "partial"]
    assert hc.stats(transformer).token_fraction < 1
    [runtime] = hc.runtimes(transformer)
    assert runtime.plan.recompute == (recompute_kv is None)
    torch.testing.assert_close(partial, run(transformer, inputs), rtol=1e-4, atol=1e-4)


def test_a_scale_changed_after_compiling_keeps_partial_steps_in_the_recompiled_graph(transformer, inputs):
    """Dynamo recompiles with the new scale read as a tensor (``.item()``); the rewritten graph's partial
    variant then compiles under a fresh shape environment (it used to stop on the scalar's recorded symbol)."""
    add_lora(transformer, "a", seed=1)
    compiled = compile_hetcache(transformer, schedule="FP", context_ratio=1.0, margin_ratio=1.0)
    for step, timestep in enumerate((900.0, 800.0, 700.0, 600.0)):
        if step == 2:
            transformer.set_adapters(["a"], weights=[0.5])
        later = {"timestep": torch.tensor([timestep])}
        torch.testing.assert_close(run(compiled, inputs, **later), run(transformer, inputs, **later),
                                   rtol=1e-4, atol=1e-4)
    stats = hc.stats(transformer)
    assert stats.steps == {"full": 2, "partial": 2, "reuse": 0} and stats.graphs == 2
    assert not stats.fallback_reasons
