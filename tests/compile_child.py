"""One process of the warm-start test (``test_compile.py``): compile a tiny WanVACE with hetcache and Inductor,
run a masked edit, then an edit with another mask, and print what Inductor's caches did as JSON.

    python tests/compile_child.py [--save-artifacts FILE] [--load-artifacts FILE]

``TORCHINDUCTOR_CACHE_DIR`` says where Inductor's caches live. With ``--save-artifacts`` the process saves
``torch.compiler.save_cache_artifacts()`` to FILE; with ``--load-artifacts`` it loads FILE first (Mega-Cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import box_mask, tiny_vace_transformer, transformer_inputs, vace_control  # noqa: E402


def counters() -> dict[str, int]:
    inductor, aot = torch._dynamo.utils.counters["inductor"], torch._dynamo.utils.counters["aot_autograd"]
    return {"fx_hit": inductor["fxgraph_cache_hit"], "fx_miss": inductor["fxgraph_cache_miss"],
            "fx_bypass": inductor["fxgraph_cache_bypass"], "aot_hit": aot["autograd_cache_hit"],
            "aot_miss": aot["autograd_cache_miss"], "aot_bypass": aot["autograd_cache_bypass"]}


def edit(compiled, transformer, box) -> float:
    """A full step then a partial step on an edit in ``box``, at the same inputs (so the cached context is exact);
    the largest difference to eager."""
    inputs = transformer_inputs(frames=3, height=8, width=8)
    inputs["control_hidden_states"] = vace_control(box_mask(3, 8, 8, box=box))
    worst = 0.0
    for timestep in (900.0, 900.0):
        step = {**inputs, "timestep": torch.full((1,), timestep)}
        out = compiled(**step, return_dict=False)[0]
        worst = max(worst, (out - transformer(**step, return_dict=False)[0]).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-artifacts")
    parser.add_argument("--load-artifacts")
    args = parser.parse_args()
    if args.load_artifacts:
        torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
    import hetcache_compile as hc

    transformer = tiny_vace_transformer(num_layers=2, vace_layers=(0,))
    compiled = torch.compile(transformer, backend="hetcache",
                             options={"schedule": "FP", "margin_radius": 0, "context_ratio": 0.25,
                                      "background_compile": False})
    with torch.no_grad():
        first_error = edit(compiled, transformer, (2, 6, 2, 6))
        before_new_mask = counters()
        second_error = edit(compiled, transformer, (0, 3, 0, 8))  # another |S|, same resolution
    stats = hc.stats(transformer)
    result = {"end": counters(), "before_new_mask": before_new_mask, "errors": [first_error, second_error],
              "steps": stats.steps,
              "compile_counts": stats.compile_counts, "cache_hits": stats.cache_hits,
              "compiled_pieces": stats.compiled_pieces}
    if args.save_artifacts:
        artifacts = torch.compiler.save_cache_artifacts()
        assert artifacts is not None, "nothing was recorded for the Mega-Cache"
        Path(args.save_artifacts).write_bytes(artifacts[0])
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
