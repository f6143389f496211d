"""Many runs in one process: outputs independent of history, memory back to the same level, compiles
only for new shapes, and an interrupted run leaves nothing behind. Also a seeded randomized sweep."""

import copy
import random

import pytest
import torch
from conftest import compile_hetcache
from measure import live_tensor_bytes
from models import box_mask, transformer_inputs, vace_control

import hetcache_compile as hc
from hetcache_compile.stats import STEP_KINDS


class Interrupted(Exception):
    pass


def denoise(model, inputs, steps, interrupt_at=None, guidance=5.0):
    """A small sequential-CFG Euler loop, as WanVACEPipeline calls the transformer."""
    x = inputs["hidden_states"]
    uncond_text = torch.zeros_like(inputs["encoder_hidden_states"])
    for i, t in enumerate(torch.linspace(999.0, 100.0, steps)):
        if i == interrupt_at:
            raise Interrupted
        call = dict(inputs, hidden_states=x, timestep=t.reshape(1))
        cond = model(**call, return_dict=False)[0]
        uncond = model(**dict(call, encoder_hidden_states=uncond_text), return_dict=False)[0]
        x = x - 0.1 * (uncond + guidance * (cond - uncond))
    return x


def edit(frames=3, height=8, box=(2, 6, 2, 6), seed=1):
    inputs = transformer_inputs(frames=frames, height=height, seed=seed)
    inputs["control_hidden_states"] = vace_control(box_mask(frames, height, 8, box=box), seed=seed + 1)
    return inputs


def compiles(model) -> int:
    stats = hc.stats(model)
    return stats.graphs + sum(stats.compile_counts.values())


RUNS = [  # (inputs, steps): masks, resolutions, frame counts, step counts and prompts all change
    (dict(), 6),
    (dict(box=(0, 2, 0, 8), seed=3), 5),
    (dict(height=12, seed=4), 6),
    (dict(), 6),  # run 0 again
    (dict(height=12, box=(4, 12, 0, 4), seed=5), 4),
    (dict(box=(0, 8, 0, 8), seed=6), 5),  # every token edited
    (dict(), 6),  # run 0 again
    (dict(height=12, seed=4), 6),  # run 2 again
    (dict(), 6),  # run 0 again
]


def test_many_runs_in_one_process_match_fresh_instances_and_hold_memory(transformer):
    options = dict(schedule="FPRPRF", margin_radius=1, context_ratio=0.3)
    compiled = compile_hetcache(transformer, **options)
    outputs, memory, compiled_so_far = [], [], []
    for i, (shape, steps) in enumerate(RUNS):
        if i == 3:
            with pytest.raises(Interrupted):  # an interrupted run before a repeat of run 0
                denoise(compiled, edit(box=(6, 8, 6, 8), seed=9), steps=6, interrupt_at=3)
        outputs.append(denoise(compiled, edit(**shape), steps))
        memory.append(live_tensor_bytes() - sum(o.untyped_storage().nbytes() for o in outputs))
        compiled_so_far.append(compiles(transformer))
    for repeat, first in ((3, 0), (6, 0), (7, 2), (8, 0)):
        torch.testing.assert_close(outputs[repeat], outputs[first], rtol=0, atol=0)
    assert memory[8] == memory[6]  # the same run, no compile between: the same bytes left behind
    assert max(memory[3:]) <= max(memory[:3]) + 64 * 1024  # nothing accumulates (compiled variants aside)
    # Shapes seen before compile nothing more (run 3 re-specializes 8 x 8 once: Dynamo switched to a
    # dynamic graph at run 2, and that graph meets 8 x 8 for the first time).
    assert compiled_so_far[8] == compiled_so_far[7] == compiled_so_far[6] == compiled_so_far[5]
    for (shape, steps), output in zip(RUNS, outputs):  # a fresh instance shares the graphs, not the state
        fresh = compile_hetcache(copy.deepcopy(transformer), **options)
        torch.testing.assert_close(output, denoise(fresh, edit(**shape), steps))
    stats = hc.stats(transformer)
    assert stats.steps["partial"] > 0 and stats.steps["reuse"] > 0 and not stats.fallback_reasons


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_invariants(seed):
    """Seeded draws of mask, schedule, batch layout and model instances; the invariants of the design:
    a full schedule equals eager, partial steps with every token equal full steps, one instance's
    calls never change another's outputs."""
    from models import tiny_vace_transformer

    rng = random.Random(seed)
    batch = rng.choice([1, 2])
    top, left = rng.randrange(0, 6), rng.randrange(0, 6)
    box = (top, top + rng.randrange(1, 8 - top + 1), left, left + rng.randrange(1, 8 - left + 1))
    inputs = transformer_inputs(batch=batch, seed=seed)
    del inputs["timestep"]
    inputs["control_hidden_states"] = vace_control(box_mask(3, 8, 8, box=box, batch=batch), seed=seed)
    a, b = tiny_vace_transformer(seed=seed), tiny_vace_transformer(seed=seed + 10)
    times = [torch.full((batch,), t) for t in (900.0, 700.0, 500.0, 300.0)]

    full = compile_hetcache(a, schedule="full")
    for t in times:
        torch.testing.assert_close(full(**inputs, timestep=t, return_dict=False)[0],
                                   a(**inputs, timestep=t, return_dict=False)[0])
    torch._dynamo.reset()
    schedule = "F" + "".join(rng.choice("PR") for _ in range(3))
    everything = dict(margin_radius=0, context_ratio=1.0, margin_ratio=1.0)
    every_token = compile_hetcache(a, schedule=schedule.replace("R", "P"), **everything)
    other = compile_hetcache(b, schedule=schedule, margin_radius=rng.choice([0, 1, 5]))
    alone = [b(**inputs, timestep=t, return_dict=False)[0] for t in times]
    for t, expected in zip(times, alone):
        torch.testing.assert_close(every_token(**inputs, timestep=t, return_dict=False)[0],
                                   a(**inputs, timestep=t, return_dict=False)[0], rtol=1e-4, atol=1e-4)
        other(**inputs, timestep=t, return_dict=False)
    history = hc.stats(b).branches["cond"].history
    assert history == [{"F": "full", "P": "partial", "R": "reuse"}[c] for c in schedule]
    assert set(hc.stats(a).steps) == set(STEP_KINDS) and hc.stats(a).steps["reuse"] == 0
    hc.reset(b)
    torch.testing.assert_close(other(**inputs, timestep=times[0], return_dict=False)[0], alone[0])


def test_a_step_that_raises_leaves_no_half_updated_cache(transformer, inputs, monkeypatch):
    compiled = compile_hetcache(transformer, schedule="FPR", margin_radius=1, context_ratio=0.3)
    compiled(**inputs, return_dict=False)
    [runtime] = hc.runtimes(transformer)
    monkeypatch.setattr(runtime, "partial", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compiled(**dict(inputs, timestep=torch.tensor([400.0])), return_dict=False)
    monkeypatch.undo()
    out = compiled(**dict(inputs, timestep=torch.tensor([300.0])), return_dict=False)[0]
    assert hc.stats(transformer).branches["cond"].history == ["full"]  # the branch started over
    torch.testing.assert_close(out, transformer(**dict(inputs, timestep=torch.tensor([300.0])), return_dict=False)[0])
