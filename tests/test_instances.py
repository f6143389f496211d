"""State belongs to the model instance a call is for, though Dynamo shares one graph per class."""

import torch
from conftest import compile_hetcache, run
from models import box_mask, tiny_vace_transformer

import hetcache_compile as hc


def test_two_models_of_one_class_keep_their_own_caches_and_stats(inputs):
    a, b = tiny_vace_transformer(seed=0), tiny_vace_transformer(seed=1)
    late = {"timestep": torch.tensor([400.0])}
    expected_b = run(b, inputs, **late)
    compiled_a, compiled_b = compile_hetcache(a, schedule="FR"), compile_hetcache(b, schedule="FR")
    run(compiled_a, inputs)
    out_b = run(compiled_b, inputs, **late)  # B's first call: full, not a reuse of A's residual
    torch.testing.assert_close(out_b, expected_b)
    assert hc.stats(b).steps == {"full": 1, "partial": 0, "reuse": 0}
    assert hc.stats(a).steps == {"full": 1, "partial": 0, "reuse": 0}
    run(compiled_a, inputs, **late)
    assert hc.stats(a).branches["cond"].history == ["full", "reuse"]
    assert hc.stats(b).branches["cond"].history == ["full"]


def test_set_mask_and_reset_act_on_one_model_only(inputs):
    a, b = tiny_vace_transformer(seed=0), tiny_vace_transformer(seed=1)
    options = dict(schedule="FP", margin_radius=0, context_ratio=0.0, size_buckets=0)
    compiled_a, compiled_b = compile_hetcache(a, **options), compile_hetcache(b, **options)
    one_token = torch.zeros(3, 4, 4, dtype=torch.bool)
    one_token[0, 0, 0] = True
    hc.set_mask(b, one_token)
    for model in (compiled_a, compiled_b, compiled_a, compiled_b):
        run(model, inputs)
    # A reads VACE's 2x2-token box per frame (12 of 48 tokens); B computes the one token it was given
    assert hc.stats(a).branches["cond"].token_fractions == [12 / 48]
    assert hc.stats(b).branches["cond"].token_fractions == [1 / 48]
    hc.reset(a)
    run(compiled_a, inputs)
    run(compiled_b, inputs)
    assert hc.stats(a).branches["cond"].history == ["full"]
    assert hc.stats(b).branches["cond"].history == ["full", "partial", "partial"]


def test_a_deleted_model_frees_its_state(inputs):
    import gc

    a, b = tiny_vace_transformer(seed=0), tiny_vace_transformer(seed=1)
    compiled_b = compile_hetcache(b, schedule="FR")
    compiled_a = compile_hetcache(a, schedule="FR")
    run(compiled_a, inputs)
    run(compiled_b, inputs)
    [runtime] = hc.runtimes(b)
    assert len(runtime.instances) == 2
    del a, compiled_a
    gc.collect()
    assert len(runtime.instances) == 1


def test_user_mask_of_one_instance_is_not_read_by_another():
    a = tiny_vace_transformer(seed=0)
    hc.set_mask(a, box_mask(3, 4, 4, box=(0, 1, 0, 1)).bool()[0])
    b = tiny_vace_transformer(seed=1)
    assert hc.priors.USER_MASKS.lookup(next(b.parameters())) is None
    assert hc.priors.USER_MASKS.lookup(next(a.parameters())) is not None
