"""Context parallelism (diffusers' ``enable_parallelism``) in 2 CPU processes over gloo.

diffusers places each rank on ``rank % torch.accelerator.device_count()``, which is 0 on a CPU
machine: the worker processes (only they) patch ``device_count`` to 1. Each test waits for its
processes with a timeout, so a deadlock fails the test instead of hanging CI. Ring attention needs
an attention backend that returns the log-sum-exp: its test swaps the CPU flash kernel into diffusers'
``_native_flash`` backend, in its worker processes only.
"""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import add_lora, tiny_vace_transformer, transformer_inputs

import hetcache_compile as hc

WORLD, TIMEOUT_S = 2, 240
TOKEN_EDIT = torch.zeros(3, 4, 4)
TOKEN_EDIT[:, 1:3, 0:2] = 1  # in both ranks' shards (each holds whole frames)
TIMESTEPS = (900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0)


def _inputs(timestep: float, frames: int = 3) -> dict:
    return {**transformer_inputs(frames=frames), "timestep": torch.tensor([timestep])}


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


def _tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def _model(family: str) -> torch.nn.Module:
    """WanVACE (its inputs carry the mask) or Wan text-to-video (``set_mask``; diffusers' own plan)."""
    if family == "vace":
        return tiny_vace_transformer()
    model = _tiny_wan()
    hc.set_mask(model, TOKEN_EDIT)
    return model


def _family_inputs(family: str, timestep: float) -> dict:
    inputs = _inputs(timestep)
    if family == "wan":
        inputs.pop("control_hidden_states")
    return inputs


def _parallel_vace(family: str = "vace"):
    from diffusers import ContextParallelConfig

    model = _model(family)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD), cp_plan=hc.cp_plan(model))
    return model


def _eager_and_plain_compiled(rank: int) -> dict:
    model = _parallel_vace()
    with torch.no_grad():
        eager = model(**_inputs(900.0), return_dict=False)[0]
        compiled = torch.compile(model, backend="aot_eager")(**_inputs(900.0), return_dict=False)[0]
    return {"eager": eager.numpy(), "compiled": compiled.numpy()}


def _reuse_collectives(model: torch.nn.Module) -> int:
    """The stack's collectives and attention ops left in the model's reuse variants (a reuse step skips the
    stack; the gather of the output after it stays)."""
    from hetcache_compile.passes.shards import is_ring_site
    from hetcache_compile.runtime import LIVE_RUNTIMES, HetCacheRuntime

    ids = {id(p) for p in model.parameters()}
    found = [rt for rt in LIVE_RUNTIMES if isinstance(rt, HetCacheRuntime) and rt.serves(ids)]
    assert found
    return sum(1 for rt in found for node in rt.reuse.gm.graph.nodes if node.op == "call_function"
               and (is_ring_site(node) or any(word in str(node.target) for word in ("all_to_all", "attention"))))


def _hetcache_run(rank: int, schedules: tuple[str, ...], options: dict, family: str = "vace") -> dict:
    """A hetcache model with rank r's schedule ``schedules[r]``, called at ``TIMESTEPS``."""
    return _run(_parallel_vace(family), schedules[rank], options, family)


def _run(model: torch.nn.Module, schedule: str, options: dict, family: str = "vace") -> dict:
    """``model`` compiled by hetcache with ``schedule``, called at ``TIMESTEPS``: outputs, warnings, statistics."""
    compiled = torch.compile(model, backend="hetcache",
                             options={"inner_backend": "aot_eager", "schedule": schedule, **options})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [compiled(**_family_inputs(family, t), return_dict=False)[0].numpy() for t in TIMESTEPS]
    said = [str(w.message) for w in caught if str(w.message).startswith("hetcache")]
    stats = hc.stats(model)
    branch = next(iter(stats.branches.values()))
    plans = sorted({rt.plan.name for rt in hc.runtimes(model) if getattr(rt, "plan", None) is not None})
    return {"outputs": outputs, "said": said, "graphs": stats.graphs, "refused": stats.fallback_reasons,
            "history": branch.history, "fractions": branch.token_fractions, "reuse_ops": _reuse_collectives(model),
            "plans": plans}


def _single_process(timestep: float) -> torch.Tensor:
    with torch.no_grad():
        return tiny_vace_transformer()(**_inputs(timestep), return_dict=False)[0]


def test_the_wan_vace_plan_equals_one_process_in_eager_and_plain_compiled_ulysses():
    result = _spawn(_eager_and_plain_compiled)[0]
    expected = _single_process(900.0)
    torch.testing.assert_close(torch.from_numpy(result["eager"]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(result["compiled"]), expected, rtol=1e-5, atol=1e-5)


def _single_process_hetcache(schedule: str, options: dict, family: str = "vace") -> list[torch.Tensor]:
    model = _model(family)
    compiled = torch.compile(model, backend="hetcache",
                             options={"inner_backend": "aot_eager", "schedule": schedule, **options})
    with torch.no_grad():
        return [compiled(**_family_inputs(family, t), return_dict=False)[0] for t in TIMESTEPS]


ALL_TOKENS = {"context_ratio": 1.0, "margin_ratio": 1.0}


def test_schedule_full_under_ulysses_equals_one_eager_process_in_one_rewritten_graph_per_rank():
    for result in _spawn(_hetcache_run, ("full", "full"), {}):
        assert result["graphs"] == 1 and result["refused"] == [] and result["said"] == []
        for output, timestep in zip(result["outputs"], TIMESTEPS):
            torch.testing.assert_close(torch.from_numpy(output), _single_process(timestep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vace", "wan"])
def test_a_fixed_schedule_gives_every_rank_the_same_history_and_the_single_process_outputs(family):
    """With every token selected a partial step computes what a full step does, and a reuse step reuses
    the same residual: the sharded run equals one process running the same schedule (WanVACE with
    hetcache's plan, Wan text-to-video with diffusers' own)."""
    schedule = "FFPRPRPF"
    results = _spawn(_hetcache_run, (schedule, schedule), ALL_TOKENS, family)
    expected = _single_process_hetcache(schedule, ALL_TOKENS, family)
    kinds = {"F": "full", "P": "partial", "R": "reuse"}
    for result in results:
        assert result["graphs"] == 1 and result["refused"] == [] and result["reuse_ops"] == 0
        assert result["history"] == [kinds[letter] for letter in schedule]
        assert result["fractions"] == [1.0] * schedule.count("P")
        assert result["plans"] == ["as computed"]  # the default recomputes, but another rank projected these keys
        for output, reference in zip(result["outputs"], expected):
            torch.testing.assert_close(torch.from_numpy(output), reference, rtol=1e-5, atol=1e-5)


def test_partial_steps_select_as_many_tokens_on_every_rank_and_rank_outputs_agree():
    schedule = "FPPFPPRP"
    results = _spawn(_hetcache_run, (schedule, schedule), {})
    assert results[0]["history"] == results[1]["history"] and results[0]["history"].count("partial") == 5
    assert results[0]["fractions"] == results[1]["fractions"] and 0 < results[0]["fractions"][0] < 1
    for mine, theirs in zip(results[0]["outputs"], results[1]["outputs"]):
        torch.testing.assert_close(torch.from_numpy(mine), torch.from_numpy(theirs), rtol=0, atol=0)


def test_ranks_whose_schedules_disagree_all_take_full_steps_instead_of_deadlocking():
    result, other = _spawn(_hetcache_run, ("FPRP", "FFFF"), {})
    assert result["history"] == other["history"] == ["full"] * len(TIMESTEPS)
    for output, timestep in zip(result["outputs"], TIMESTEPS):
        torch.testing.assert_close(torch.from_numpy(output), _single_process(timestep), rtol=1e-5, atol=1e-5)


def _same_inputs_twice(rank: int, options: dict) -> dict:
    """A full, then a partial step at the same inputs: the cached context rows are exact but for their storage."""
    model = _parallel_vace()
    compiled = torch.compile(model, backend="hetcache", options={
        "inner_backend": "aot_eager", "schedule": "FP", "margin_radius": 1, "context_ratio": 0.0,
        "margin_ratio": 0.0, **options})
    with torch.no_grad():
        outputs = [compiled(**_inputs(900.0), return_dict=False)[0].numpy() for _ in range(2)]
    branch = hc.stats(model).branches["cond"]
    plans = sorted({rt.plan.name for rt in hc.runtimes(model) if getattr(rt, "plan", None) is not None})
    return {"outputs": outputs, "history": branch.history, "fractions": branch.token_fractions, "plans": plans}


def test_float8_caches_under_ulysses_keep_the_partial_step_within_float8_error_of_the_full_one():
    """Each rank stores its heads of every context token in float8, a scale per token and head."""
    for result in _spawn(_same_inputs_twice, {"cache_dtype": "float8_e4m3fn"}):
        assert result["history"] == ["full", "partial"] and 0 < result["fractions"][0] < 1
        assert result["plans"] == ["float8_e4m3fn"]
        full, partial = (torch.from_numpy(output) for output in result["outputs"])
        torch.testing.assert_close(partial, full, rtol=0, atol=1e-2)
        assert (partial - full).abs().max() > 1e-4  # above float32 rounding: the context came from float8 caches


def _two_experts(rank: int | None) -> dict:
    """Wan 2.2's layout: one expert above a boundary timestep, another below it, both compiled by hetcache with
    schedule "FPRP" (every token selected); under Ulysses when ``rank`` is given, else in one process."""
    from diffusers import ContextParallelConfig

    experts = [_tiny_wan(seed) for seed in (0, 1)]
    outputs, histories, graphs = [], [], []
    for expert in experts:
        hc.set_mask(expert, TOKEN_EDIT)
        if rank is not None:
            expert.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD), cp_plan=hc.cp_plan(expert))
    compiled = [torch.compile(expert, backend="hetcache", options={
        "inner_backend": "aot_eager", "schedule": "FPRP", **ALL_TOKENS}) for expert in experts]
    with torch.no_grad():
        for step, timestep in enumerate(TIMESTEPS):
            model = compiled[step >= len(TIMESTEPS) // 2]
            outputs.append(model(**_family_inputs("wan", timestep), return_dict=False)[0].numpy())
    for expert in experts:
        stats = hc.stats(expert)
        histories.append(stats.branches["cond"].history)
        graphs.append((stats.graphs, stats.fallback_reasons))
    return {"outputs": outputs, "histories": histories, "graphs": graphs}


def test_wan22s_two_experts_under_ulysses_keep_their_own_caches_and_equal_one_process():
    results = _spawn(_two_experts)
    expected = _two_experts(None)
    assert expected["histories"] == [["full", "partial", "reuse", "partial"]] * 2  # each expert from its own full
    for result in results:
        assert result["histories"] == expected["histories"]
        assert result["graphs"] == [(1, []), (1, [])]  # one rewritten graph each
        for output, reference in zip(result["outputs"], expected["outputs"], strict=True):
            torch.testing.assert_close(torch.from_numpy(output), torch.from_numpy(reference), rtol=1e-5, atol=1e-5)


def _lora_scaled_after_compiling(rank: int | None) -> dict:
    """WanVACE with a LoRA adapter, compiled, called 4 times, the adapter scaled, called 4 more: under Ulysses
    when ``rank`` is given, else in one process."""
    from diffusers import ContextParallelConfig

    model = tiny_vace_transformer()
    add_lora(model, "a", seed=1)
    if rank is not None:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD), cp_plan=hc.cp_plan(model))
    compiled = torch.compile(model, backend="hetcache", options={
        "inner_backend": "aot_eager", "schedule": "FPRP", **ALL_TOKENS})
    outputs = []
    with torch.no_grad():
        for step, timestep in enumerate(TIMESTEPS):
            if step == len(TIMESTEPS) // 2:
                model.set_adapters(["a"], weights=[0.5])
            outputs.append(compiled(**_inputs(timestep), return_dict=False)[0].numpy())
    stats = hc.stats(model)
    return {"outputs": outputs, "history": stats.branches["cond"].history, "steps": stats.steps,
            "graphs": (stats.graphs, stats.fallback_reasons)}


def test_a_lora_scaled_after_compiling_under_ulysses_starts_a_new_run_and_equals_one_process():
    results = _spawn(_lora_scaled_after_compiling)
    expected = _lora_scaled_after_compiling(None)
    # the new scale recompiles (Dynamo reads it as a tensor now) and starts a new run, rewritten as well: the
    # scale's placeholder is the model's state, not an input that would tell queries from keys
    assert expected["history"] == ["full", "partial", "reuse", "partial"] * 2 and expected["graphs"] == (2, [])
    for result in results:
        assert result["history"] == expected["history"] and result["graphs"] == (2, [])
        for output, reference in zip(result["outputs"], expected["outputs"], strict=True):
            torch.testing.assert_close(torch.from_numpy(output), torch.from_numpy(reference), rtol=1e-5, atol=1e-5)


def _masks_differ(rank: int) -> dict:
    """Each rank given its own mask (a user error): partial steps of different sizes would hang the exchanges."""
    model = _parallel_vace()
    edit = TOKEN_EDIT.clone()
    edit[:, :, 2:] = rank  # rank 1 edits half of each frame more
    hc.set_mask(model, edit)
    compiled = torch.compile(model, backend="hetcache",
                             options={"inner_backend": "aot_eager", "schedule": "FPRPFPRP"})
    with torch.no_grad():
        outputs = [compiled(**_inputs(t), return_dict=False)[0].numpy() for t in TIMESTEPS]
    return {"outputs": outputs, "history": hc.stats(model).branches["cond"].history}


def test_ranks_whose_masks_differ_take_full_steps_instead_of_exchanging_unequal_shapes():
    result, other = _spawn(_masks_differ)
    assert result["history"] == other["history"] and "partial" not in result["history"]
    assert "reuse" in result["history"]  # reuse steps exchange nothing and agree


def _two_resolutions(rank: int) -> dict:
    model = _parallel_vace()
    compiled = torch.compile(model, backend="hetcache",
                             options={"inner_backend": "aot_eager", "schedule": "FPRP", **ALL_TOKENS})
    outputs, histories = [], []
    with torch.no_grad():
        for frames in (3, 5):
            outputs += [compiled(**_inputs(t, frames), return_dict=False)[0].numpy() for t in TIMESTEPS[:4]]
            histories.append(hc.stats(model).branches["cond"].history)
    return {"outputs": outputs, "histories": histories}


def test_a_second_resolution_under_ulysses_keeps_partial_steps_and_equals_one_process():
    """The second shape makes Dynamo trace with dynamic shapes; each shape is specialized and rewritten, the
    attention's all-to-all sizes included."""
    result = _spawn(_two_resolutions)[0]
    model = tiny_vace_transformer()
    compiled = torch.compile(model, backend="hetcache",
                             options={"inner_backend": "aot_eager", "schedule": "FPRP", **ALL_TOKENS})
    with torch.no_grad():
        expected = [compiled(**_inputs(t, frames), return_dict=False)[0] for frames in (3, 5) for t in TIMESTEPS[:4]]
    assert result["histories"] == [["full", "partial", "reuse", "partial"]] * 2
    for output, reference in zip(result["outputs"], expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(output), reference, rtol=1e-5, atol=1e-5)


def _wan_without_hetcache_plan(rank: int) -> dict:
    from diffusers import ContextParallelConfig

    model = _model("wan")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))  # diffusers' plan, not readied
    compiled = torch.compile(model, backend="hetcache", options={"inner_backend": "aot_eager", "schedule": "FPRP"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [compiled(**_family_inputs("wan", t), return_dict=False)[0].numpy() for t in TIMESTEPS[:4]]
    return {"outputs": outputs, "said": [str(w.message) for w in caught if str(w.message).startswith("hetcache")]}


def test_without_hetcaches_plan_the_fragments_compile_unchanged_and_rank_zero_says_what_to_pass():
    """diffusers' hooks break Dynamo's trace into a graph per block unless the model was readied by
    ``cp_plan(model)``: nothing is rewritten, the outputs are exact, and the warning names the fix."""
    result, other = _spawn(_wan_without_hetcache_plan)
    reference = _tiny_wan()
    for output, timestep in zip(result["outputs"], TIMESTEPS):
        with torch.no_grad():
            expected = reference(**_family_inputs("wan", timestep), return_dict=False)[0]
        torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-5, atol=1e-5)
    assert any("cp_plan=hetcache_compile.cp_plan(model)" in said for said in result["said"]), result["said"]
    assert other["said"] == []


def _cpu_flash_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' ``_native_flash`` forward op on the CPU kernel, which returns the log-sum-exp Ring needs."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, scale=scale)
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def _flash_model(degree: str) -> torch.nn.Module:
    """The tiny WanVACE on diffusers' ``_native_flash`` backend (CPU kernel) over ``degree`` (ring or ulysses)."""
    import diffusers.models.attention_dispatch as dispatch
    from diffusers import ContextParallelConfig

    dispatch._native_flash_attention_forward_op = _cpu_flash_forward_op  # these test processes only
    model = tiny_vace_transformer()
    model.set_attention_backend("_native_flash")
    model.enable_parallelism(config=ContextParallelConfig(**{degree: WORLD}), cp_plan=hc.cp_plan(model))
    return model


def _flash_run(rank: int, schedule: str, options: dict, degree: str = "ring_degree") -> dict:
    return _run(_flash_model(degree), schedule, options)


@pytest.mark.parametrize("degree", ["ring_degree", "ulysses_degree"])
def test_on_a_flash_backend_full_partial_and_reuse_steps_equal_one_process(degree):
    """Ring attention needs a backend that returns the log-sum-exp: on the CPU, diffusers' ``_native_flash``
    with its op swapped for the CPU flash kernel (in the test processes only). Under Ring each rank caches
    its own context rows, all heads, joined to its fresh rows before the gather of keys and values; under
    Ulysses the attention is the backend's kernel (its arguments read by name), not SDPA."""
    schedule = "FFPRPRPF"
    results = _spawn(_flash_run, schedule, ALL_TOKENS, degree)
    expected = _single_process_hetcache(schedule, ALL_TOKENS)
    kinds = {"F": "full", "P": "partial", "R": "reuse"}
    for result in results:
        assert result["graphs"] == 1 and result["refused"] == [] and result["said"] == []
        assert result["reuse_ops"] == 0  # no collective nor attention kept alive in a step that skips the stack
        assert result["history"] == [kinds[letter] for letter in schedule]
        for output, reference in zip(result["outputs"], expected):
            torch.testing.assert_close(torch.from_numpy(output), reference, rtol=1e-5, atol=1e-5)
    selected = _spawn(_flash_run, "FPPFPPRP", {}, degree)
    assert selected[0]["fractions"] == selected[1]["fractions"] and 0 < selected[0]["fractions"][0] < 1


def test_cp_plan_names_the_class_it_has_no_plan_for():
    with pytest.raises(ValueError, match="Linear"):
        hc.cp_plan(torch.nn.Linear(2, 2))
    from diffusers import WanTransformer3DModel

    assert hc.cp_plan(WanTransformer3DModel) is WanTransformer3DModel._cp_plan
