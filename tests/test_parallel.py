"""Context parallelism (diffusers' ``enable_parallelism``) in 2 CPU processes over gloo.

diffusers places each rank on ``rank % torch.accelerator.device_count()``, which is 0 on a CPU
machine: the worker processes (only they) patch ``device_count`` to 1. Each test waits for its
processes with a timeout, so a deadlock fails the test instead of hanging CI. Ring attention needs
an attention backend that returns the log-sum-exp, which none does on the CPU: Ulysses only here.
"""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import tiny_vace_transformer, transformer_inputs

import hetcache_compile as hc

WORLD, TIMEOUT_S = 2, 240
TIMESTEPS = (900.0, 800.0, 700.0, 600.0)


def _inputs(timestep: float) -> dict:
    return {**transformer_inputs(), "timestep": torch.tensor([timestep])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args) -> list[dict]:
    """Run ``worker(rank, *args)`` on ``WORLD`` ranks; returns their results by rank (numpy arrays, strings)."""
    context = mp.get_context("spawn")
    results, port = context.Queue(), _free_port()
    processes = [context.Process(target=_entry, args=(rank, port, results, worker, args)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    try:
        found = [results.get(timeout=TIMEOUT_S) for _ in range(WORLD)]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [result["error"] for result in found if "error" in result]
    assert not errors, errors[0]
    return sorted(found, key=lambda result: result["rank"])


def _entry(rank: int, port: int, results, worker, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # CPU: diffusers places rank r on device r % device_count
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        results.put({"rank": rank, **worker(rank, *args)})
    except BaseException as error:  # the parent reports it
        results.put({"rank": rank, "error": f"rank {rank}: {type(error).__name__}: {error}"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _parallel_vace():
    from diffusers import ContextParallelConfig

    model = tiny_vace_transformer()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD), cp_plan=hc.cp_plan(model))
    return model


def _eager_and_plain_compiled(rank: int) -> dict:
    model = _parallel_vace()
    with torch.no_grad():
        eager = model(**_inputs(900.0), return_dict=False)[0]
        compiled = torch.compile(model, backend="aot_eager")(**_inputs(900.0), return_dict=False)[0]
    return {"eager": eager.numpy(), "compiled": compiled.numpy()}


def _hetcache(rank: int) -> dict:
    model = _parallel_vace()
    compiled = torch.compile(model, backend="hetcache", options={"inner_backend": "aot_eager", "schedule": "FPRP"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [compiled(**_inputs(t), return_dict=False)[0].numpy() for t in TIMESTEPS]
    said = [str(w.message) for w in caught if str(w.message).startswith("hetcache")]
    stats = hc.stats(model)
    return {"outputs": outputs, "said": said, "graphs": stats.graphs,
            "rewritten": stats.graphs - len(stats.fallback_reasons)}


def _single_process(timestep: float) -> torch.Tensor:
    with torch.no_grad():
        return tiny_vace_transformer()(**_inputs(timestep), return_dict=False)[0]


def test_the_wan_vace_plan_equals_one_process_in_eager_and_plain_compiled_ulysses():
    result = _spawn(_eager_and_plain_compiled)[0]
    expected = _single_process(900.0)
    torch.testing.assert_close(torch.from_numpy(result["eager"]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(result["compiled"]), expected, rtol=1e-5, atol=1e-5)


def test_hetcache_under_context_parallelism_compiles_unchanged_exactly_and_says_why_on_rank_zero_only():
    """Partial and reuse steps under context parallelism are issue 15: until then every sharded graph is refused
    (a schedule that skips still gives full-step outputs) with the reason warned on rank 0 only."""
    result, other = _spawn(_hetcache)
    for output, timestep in zip(result["outputs"], TIMESTEPS):
        torch.testing.assert_close(torch.from_numpy(output), _single_process(timestep), rtol=1e-5, atol=1e-5)
    assert result["graphs"] > 0 and result["rewritten"] == 0
    assert any("context parallelism" in said for said in result["said"]), result["said"]
    assert other["said"] == [] and other["rewritten"] == 0


def test_cp_plan_names_the_class_it_has_no_plan_for():
    with pytest.raises(ValueError, match="Linear"):
        hc.cp_plan(torch.nn.Linear(2, 2))
    from diffusers import WanTransformer3DModel

    assert hc.cp_plan(WanTransformer3DModel) is WanTransformer3DModel._cp_plan
