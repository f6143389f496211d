"""hetcache demo: a small WanVACE masked video edit on CPU, plain torch.compile vs ``backend="hetcache"``.

Random-weight components (``tests/models.py``), text given as ``prompt_embeds``, CFG on. Each
compiled pipeline runs twice: the first run compiles and warms up, the second is timed. Prints
the step kind hetcache chose for every transformer call of each CFG branch, the speedup over
plain torch.compile (Inductor), and the start of ``hetcache_compile.explain``.

    python examples/demo.py                    # default hetcache options (adaptive schedule)
    python examples/demo.py --preset fast      # let the adaptive schedule skip more
    python examples/demo.py --schedule FFRFRF  # a fixed schedule (last letter repeats)

Takes about a minute or two on 2 CPU cores, most of it Inductor compiling. hetcache's first run starts at
once, its pieces uncompiled, while Inductor compiles them in the background; the demo then waits for that
compilation to end before the timed run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from models import edit_inputs, tiny_vace_pipeline, tiny_vace_transformer  # noqa: E402

import hetcache_compile as hc  # noqa: E402  (only for stats/explain: the backend needs no import)

MODEL = dict(num_layers=8, vace_layers=(0, 2, 4, 6), heads=4, head_dim=32, text_dim=64, ffn_dim=256)
INPUTS = dict(frames=9, height=64, width=64, text_dim=64)
LETTER = {"full": "F", "partial": "P", "reuse": "R"}


def edit(pipe, inputs: dict, steps: int) -> tuple[torch.Tensor, float]:
    """One masked edit; returns the video (frames, channels, height, width) and its wall-clock seconds."""
    start = time.perf_counter()
    video = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames[0]
    return video, time.perf_counter() - start


def compile_and_time(transformer: torch.nn.Module, inputs: dict, steps: int, label: str, **compile_kwargs):
    torch._dynamo.reset()
    model = torch.compile(transformer, **compile_kwargs)
    pipe = tiny_vace_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    _, first = edit(pipe, inputs, steps)
    print(f"{label:<26} first run (compiles): {first:6.1f} s", flush=True)
    if compile_kwargs.get("backend") == "hetcache":  # it compiles in the background while the first run goes on
        start = time.perf_counter()
        hc.finish_compiling(model)
        print(f"{label:<26} compiling after it:   {time.perf_counter() - start:6.1f} s", flush=True)
    video, second = edit(pipe, inputs, steps)
    print(f"{label:<26} second run (timed):   {second:6.2f} s", flush=True)
    return model, video, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--schedule", help="hetcache option: 'adaptive' (default), 'full' or e.g. 'FFRFRF'")
    parser.add_argument("--threshold", type=float, help="hetcache option: adaptive-schedule threshold")
    parser.add_argument("--preset", choices=("quality", "balanced", "fast"), help="hetcache option")
    parser.add_argument("--inner-backend", choices=("inductor", "aot_eager", "eager"),
                        help="hetcache option: compiler of its variants (default inductor)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.getloadavg()[0] > 0.5 and torch.get_num_threads() > 1:
        print(f"warning: load average {os.getloadavg()[0]:.1f}: with one thread per core, PyTorch slows down "
              f"many times over when another process holds a core; timings may be off (try --threads 1)")
    options = {key: value for key, value in (("schedule", args.schedule), ("threshold", args.threshold),
                                             ("preset", args.preset), ("inner_backend", args.inner_backend))
               if value is not None}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; masked edit of "
          f"{INPUTS['frames']} frames {INPUTS['height']}x{INPUTS['width']}, {args.steps} steps, CFG on")
    transformer = tiny_vace_transformer(**MODEL)
    inputs = edit_inputs(**INPUTS)

    _, reference, baseline = compile_and_time(copy.deepcopy(transformer), inputs, args.steps,
                                              "torch.compile (inductor)", backend="inductor")
    label = f"hetcache {options or '(default options)'}"
    model, video, seconds = compile_and_time(copy.deepcopy(transformer), inputs, args.steps, "hetcache",
                                             backend="hetcache", options=options)

    stats = hc.stats(model)
    print(f"\n{label}: step kinds of the timed run (F full, P partial, R reuse)")
    for name, branch in stats.branches.items():
        counts = ", ".join(f"{kind} {branch.history.count(kind)}" for kind in LETTER)
        print(f"  {name:<7} {''.join(LETTER[kind] for kind in branch.history)}  ({counts})")
    print(f"  totals over both runs: {stats.summary()}")
    print("  variant compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stats.compile_seconds.items()))
    print(f"\nspeedup vs plain torch.compile: {baseline / seconds:.2f}x "
          f"({baseline:.2f} s -> {seconds:.2f} s, second runs)")
    print(f"max abs difference of the video vs plain torch.compile: {(video - reference).abs().max().item():.2e}")
    if stats.steps["reuse"] + stats.steps["partial"] == 0 and not stats.fallback_reasons:
        threshold = hc.HetCacheConfig.from_options(options).threshold
        print(f"note: every call was full, so hetcache only added its bookkeeping: the timestep modulation\n"
              f"      changed by more than the threshold ({threshold}) at each step. Random weights change\n"
              f"      it more than a trained Wan model does; try a larger --threshold or --schedule FFRF.")

    # explain() lists every attention site; keep the summary lines.
    explanation = hc.explain(model).splitlines()
    brief = [line for line in explanation if not (" q=" in line and " k=" in line)]
    print(f"\nhetcache_compile.explain (without its {len(explanation) - len(brief)} per-site lines):")
    print("\n".join("  " + (line if len(line) <= 150 else line[:147] + "...") for line in brief[:12]))


if __name__ == "__main__":
    main()
