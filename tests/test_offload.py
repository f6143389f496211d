"""Host offload of the context caches (``cache_device="cpu"``), on a CPU machine: exactness and graph shape."""

import pytest
import torch
from conftest import compile_hetcache, run
from models import tiny_vace_transformer

import hetcache_compile as hc

PARTIAL = {"margin_radius": 1, "context_ratio": 0.25, "margin_ratio": 0.5}
STEPS = ({}, {"timestep": torch.tensor([400.0])}, {"timestep": torch.tensor([300.0])},
         {"timestep": torch.tensor([200.0])})


def _run_steps(model, inputs, **options):
    """Full, partial, reuse, partial; returns the outputs and the most bytes held on the device and host."""
    compiled = compile_hetcache(model, schedule="FPRP", **PARTIAL, **options)
    outputs, device, host = [], 0, 0
    for step in STEPS:
        outputs.append(run(compiled, inputs, **step))
        device, host = max(device, hc.stats(model).cache_bytes), max(host, hc.stats(model).host_cache_bytes)
    assert hc.stats(model).branches["cond"].history == ["full", "partial", "reuse", "partial"]
    return outputs, device, host


def _variant_nodes(model, variant: str, op_name: str) -> list:
    [runtime] = hc.runtimes(model)
    graph = getattr(runtime, variant).gm.graph
    return [n for n in graph.nodes if n.op == "call_function" and op_name in str(n.target)]


@pytest.mark.parametrize("plan", [{}, {"recompute_kv": False}, {"cache_dtype": "float8_e4m3fn"}],
                         ids=["default-recomputed", "as-computed", "float8-recomputed"])
def test_host_offload_equals_device_caches_bit_for_bit(transformer, inputs, plan):
    expected, device_bytes, _ = _run_steps(transformer, inputs, **plan)
    torch._dynamo.reset()
    got, offload_device_bytes, host_bytes = _run_steps(transformer, inputs, cache_device="cpu", **plan)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {step} differs"
    assert host_bytes > 0 and offload_device_bytes + host_bytes == device_bytes


def _sites(runtime, variant: str) -> list:
    """The self-attention nodes of a variant, in graph order."""
    names = {site.node for site in runtime.analysis.self_sites}
    return [n for n in getattr(runtime, variant).gm.graph.nodes if n.name in names]


def test_full_steps_copy_each_sites_caches_out_right_after_its_attention(transformer, inputs):
    _run_steps(transformer, inputs, cache_device="cpu", recompute_kv=False)
    [runtime] = hc.runtimes(transformer)
    order = list(runtime.record.gm.graph.nodes)
    copies = _variant_nodes(transformer, "record", "to_host")
    sites = _sites(runtime, "record")
    assert len(sites) == 6 and len(copies) == 2 * len(sites)  # keys and values of blocks and VACE blocks
    for j, site in enumerate(sites):
        for copy in copies[2 * j:2 * j + 2]:
            stored = copy.args[0].args[0]  # to_host(detach(keys or values))
            assert site in stored.users and 0 < order.index(copy) - order.index(site) <= 4


def test_partial_steps_fetch_each_site_one_attention_ahead(transformer, inputs):
    _run_steps(transformer, inputs, cache_device="cpu", recompute_kv=False)
    [runtime] = hc.runtimes(transformer)
    order = list(runtime.partial.gm.graph.nodes)
    fetches = _variant_nodes(transformer, "partial", "to_device")
    waits = _variant_nodes(transformer, "partial", "ready")
    sites = _sites(runtime, "partial")
    assert len(sites) == 6 and len(fetches) == len(waits) == 2 * len(sites)
    for j, site in enumerate(sites):
        ahead = sites[j - 1] if j else site
        started_after = order.index(sites[j - 2]) if j > 1 else -1
        for fetch, wait in zip(fetches[2 * j:2 * j + 2], waits[2 * j:2 * j + 2]):
            assert started_after < order.index(fetch) < order.index(ahead)  # one attention ahead, no earlier
            assert wait.args[0] is fetch and order.index(wait) < order.index(site)
            assert j == 0 or order.index(ahead) < order.index(wait)  # the attention ahead runs during the copy
            assert list(fetch.users) == [wait]  # nothing reads the copy before the compute stream waited for it


def _priced_bytes_per_branch(model, inputs, **options) -> int:
    compile_hetcache(model, schedule="FP", **PARTIAL, max_cache_bytes=2**40, **options)(**inputs, return_dict=False)
    [runtime] = hc.runtimes(model)
    torch._dynamo.reset()
    return runtime.plan.bytes_per_branch


def test_a_budget_below_the_exact_device_plan_keeps_exact_partial_steps_offloaded(transformer, inputs):
    offloaded = _priced_bytes_per_branch(transformer, inputs, cache_device="cpu")
    assert offloaded < _priced_bytes_per_branch(transformer, inputs)  # the exact plan on the device does not fit
    limit = 2 * offloaded
    compiled = compile_hetcache(transformer, schedule="FPRP", **PARTIAL, cache_device="cpu", max_cache_bytes=limit)
    for step in STEPS:
        run(compiled, inputs, **step)
        assert hc.stats(transformer).cache_bytes <= limit
    [runtime] = hc.runtimes(transformer)
    assert runtime.plan.name == "as computed, keys/values recomputed, in host memory" and runtime.plan.fits
    assert "in host memory" in hc.explain(compiled)
    assert hc.stats(transformer).branches["cond"].history == ["full", "partial", "reuse", "partial"]


def test_a_budget_of_40_percent_of_the_default_plan_keeps_partial_steps_in_both_branches(inputs):
    """15 cached sites: as at real sizes, the per-site caches (not the residual and relevance tensors a
    branch also keeps) are most of the default plan's bytes."""
    transformer = tiny_vace_transformer(num_layers=12, vace_layers=(0, 4, 8))
    limit = int(0.4 * 2 * _priced_bytes_per_branch(transformer, inputs))  # two CFG branches of the default plan
    uncond = {"encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    compiled = compile_hetcache(transformer, schedule="FPRP", **PARTIAL, cache_device="cpu", max_cache_bytes=limit)
    for step in STEPS:
        for branch in ({}, uncond):
            run(compiled, inputs, **step, **branch)
            assert hc.stats(transformer).cache_bytes <= limit
    [runtime] = hc.runtimes(transformer)
    assert runtime.plan.fits and runtime.plan.name == "as computed, keys/values recomputed, in host memory"
    for branch in hc.stats(transformer).branches.values():
        assert branch.history == ["full", "partial", "reuse", "partial"]


def test_cache_device_is_refused_where_it_cannot_apply():
    with pytest.raises(hc.HetCacheOptionsError, match="cache_device"):
        hc.HetCacheConfig.from_options({"cache_device": "cpu", "prune": "attention"})
    with pytest.raises(hc.HetCacheOptionsError, match="cache_device"):
        hc.HetCacheConfig.from_options({"cache_device": "cuda:1"})
