"""Compilation: a repeated block compiled once, a new mask compiling nothing, compiling in the background,
warm starts from Inductor's caches, and regional compilation refused with what to call instead."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from conftest import compile_hetcache, run
from models import box_mask, tiny_vace_transformer, transformer_inputs, vace_control

import hetcache_compile as hc
from hetcache_compile.config import HetCacheConfig
from hetcache_compile.piecewise import PieceCompiler, SymbolicSizes


def edit(compiled, inputs, timesteps=(900.0, 800.0, 700.0, 600.0)) -> list[torch.Tensor]:
    return [run(compiled, inputs, timestep=torch.full((1,), t)) for t in timesteps]


def test_compile_work_does_not_grow_with_the_depth_of_the_stack():
    pieces = {}
    for layers in (4, 8):
        transformer = tiny_vace_transformer(num_layers=layers, vace_layers=(0, 2))
        compiled = compile_hetcache(transformer, schedule="FRP", margin_radius=0)
        edit(compiled, transformer_inputs())
        pieces[layers] = hc.stats(transformer).compiled_pieces
        torch._dynamo.reset()
    assert pieces[4] == pieces[8]  # four more blocks, not one more piece to compile
    assert pieces[4]["record"] < 4 + 2 + 2  # fewer pieces than blocks plus prologue and epilogue
    assert pieces[4]["partial"] > 0 and pieces[4]["reuse"] > 0


def test_explain_and_stats_say_what_each_variant_compilation_cost(transformer, inputs):
    compiled = compile_hetcache(transformer, schedule="FRP", margin_radius=0)
    edit(compiled, inputs)
    report = hc.explain(transformer)
    assert "compilation (aot_eager, at their first call, block by block)" in report
    assert "record: " in report and " distinct, " in report and "full: not compiled yet" in report
    stats = hc.stats(transformer)
    assert stats.compile_seconds["partial"] > 0 and "compiled" in stats.summary()


@pytest.mark.parametrize("options", [{"piecewise": False}, {"background_compile": True}])
def test_whole_graph_and_background_compilation_compute_what_block_by_block_does(transformer, inputs, options):
    reference = edit(compile_hetcache(transformer, schedule="FRPRF", margin_radius=0), inputs)
    torch._dynamo.reset()
    compiled = compile_hetcache(transformer, schedule="FRPRF", margin_radius=0, **options)
    outputs = edit(compiled, inputs, timesteps=(900.0, 800.0, 700.0, 600.0, 500.0))
    hc.finish_compiling(transformer)
    for got, expected in zip(outputs, reference):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    stats = hc.stats(transformer)
    assert "".join(kind[0].upper() for kind in stats.branches["cond"].history) == "FRPRF"
    assert stats.compile_seconds["record"] > 0 and stats.compile_counts["partial"] == 1


def test_a_new_mask_at_a_seen_resolution_compiles_nothing(transformer):
    """|S| is a symbol (the default with Inductor; asked for here, with aot_eager)."""
    compiled = compile_hetcache(transformer, schedule="FP", margin_radius=0, context_ratio=0.0, symbolic_sizes=True)
    counts = []
    for box in ((2, 6, 2, 6), (0, 2, 0, 8), (0, 8, 0, 3)):  # 12, 6 and 12 generative tokens of a different shape
        inputs = transformer_inputs()
        inputs["control_hidden_states"] = vace_control(box_mask(box=box))
        full, partial = edit(compiled, inputs, timesteps=(900.0, 900.0))
        torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-4)  # same inputs: the cached context is exact
        counts.append(dict(hc.stats(transformer).compile_counts))
    assert counts[0] == counts[1] == counts[2] and counts[0]["partial"] == 1


def test_sizes_the_symbolic_compilation_does_not_admit_get_a_static_one():
    """|S| is a symbol of at least 2 rows (shape environments specialize 0 and 1): a 1-row step is not admitted."""
    def select(index, rows, cache):
        picked = rows.index_select(1, index) * 2
        return (torch.cat([cache, picked], 1).sum(1),)

    gm = fx.symbolic_trace(select)
    compiler = PieceCompiler(HetCacheConfig(inner_backend="aot_eager"))
    sizes = SymbolicSizes({0: {0: "selected"}, 2: {1: "context"}})
    rows = torch.randn(1, 10, 4)
    graph = compiler.prepare("toy", gm, [torch.arange(3), rows, torch.randn(1, 7, 4)], sizes)
    compiler.compile_now(graph)
    for selected in (2, 5, 8):
        args = [torch.arange(selected), rows, torch.randn(1, 10 - selected, 4)]
        assert graph.admits(args)
        torch.testing.assert_close(graph(*args)[0], select(*args)[0])
    assert not graph.admits([torch.arange(1), rows, torch.randn(1, 9, 4)])
    assert not graph.admits([torch.arange(3), rows, torch.randn(1, 9, 4)])  # 3 + 9 rows: not this resolution's


def test_regional_compilation_is_refused_with_what_to_call_instead_and_counts_model_calls(transformer, inputs):
    expected = run(transformer, inputs)
    transformer.compile_repeated_blocks(backend="hetcache", options={"inner_backend": "aot_eager"})
    with pytest.warns(UserWarning, match=r"compile_repeated_blocks.*torch\.compile\(model, backend=\"hetcache\"\)"):
        outputs = edit(transformer, inputs, timesteps=(500.0, 500.0, 500.0))
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    stats = hc.stats(transformer)
    assert stats.calls == 3 and stats.steps == {"full": 3, "partial": 0, "reuse": 0}  # model calls, not block calls
    assert "compile it with torch.compile(model" in stats.fallback_reason


def run_child(cache: Path, *flags: str) -> dict:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    child = Path(__file__).with_name("compile_child.py")
    done = subprocess.run([sys.executable, str(child), *flags], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.inductor
def test_a_warm_start_compiles_nothing_from_the_cache_directory_or_the_mega_cache(tmp_path):
    artifacts = tmp_path / "artifacts.bin"
    cold = run_child(tmp_path / "cache", "--save-artifacts", str(artifacts))
    assert cold["steps"] == {"full": 2, "partial": 2, "reuse": 0} and max(cold["errors"]) < 1e-4
    assert cold["end"]["fx_miss"] > 0 and cold["end"]["aot_bypass"] == 0
    assert cold["end"] == cold["before_new_mask"], cold  # the second mask compiled nothing at all
    assert cold["compile_counts"]["partial"] == 1

    for warm in (run_child(tmp_path / "cache"),  # a new process on the same cache directory
                 run_child(tmp_path / "empty", "--load-artifacts", str(artifacts))):  # Mega-Cache, empty directory
        assert warm["end"]["fx_miss"] == 0 and warm["end"]["aot_miss"] == 0 and warm["end"]["aot_bypass"] == 0
        assert warm["end"]["aot_hit"] == cold["end"]["aot_miss"] > 0
        assert warm["cache_hits"] == warm["compiled_pieces"]
        assert warm["steps"] == cold["steps"] and max(warm["errors"]) < 1e-4
