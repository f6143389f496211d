"""Many WanVACEPipeline runs in one process: outputs, memory and compiles run after run.

Twenty (``--runs``) masked edits with different masks, resolutions, frame counts, step counts and
prompts go through one pipeline whose transformer is compiled once with ``backend="hetcache"``;
one run is interrupted mid-loop by a callback that raises. For each run the table gives the
maximum difference to the same edit computed in a fresh process (``--fresh``, one subprocess per
run), the bytes of live tensors and of hetcache's caches after it, and the compiles counted so far
(Dynamo graphs and variant compilations).

    python benchmarks/soak.py --threads 2               # 20 runs, about 15 min on 2 CPU cores
    python benchmarks/soak.py --runs 6 --no-fresh       # quick look, no subprocesses
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import REPO_ROOT, command_line, edit_inputs, machine_description, source_description, tiny_vace_pipeline
from common import tiny_vace_transformer, utc_now, write_table
from measure import live_tensor_bytes
from tqdm import tqdm

import hetcache_compile as hc

SIZES = [(64, 64), (96, 64), (64, 96)]
FRAMES = [5, 9]
BOXES = [(0.25, 0.75, 0.25, 0.75), (0.0, 0.5, 0.0, 0.5), (0.5, 1.0, 0.25, 1.0), (0.1, 0.3, 0.6, 0.9), (0.0, 1.0, 0.0, 1.0)]
OPTIONS = {"inner_backend": "aot_eager"}


class Interrupted(Exception):
    pass


def run_config(i: int) -> dict:
    """The i-th edit: every field cycles with its own period, so the combinations vary."""
    height, width = SIZES[i % len(SIZES)]
    return {"height": height, "width": width, "frames": FRAMES[(i // 2) % len(FRAMES)],
            "box": BOXES[i % len(BOXES)], "steps": 4 + i % 4, "seed": i, "interrupt": i == 7}


def edit(pipe, config: dict) -> torch.Tensor:
    inputs = edit_inputs(frames=config["frames"], height=config["height"], width=config["width"],
                         seed=config["seed"], box=config["box"])
    steps = config["steps"]

    def interrupt(pipeline, step, timestep, kwargs):
        if config["interrupt"] and step == steps // 2:
            raise Interrupted
        return kwargs

    if config["interrupt"]:
        try:
            pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=interrupt)
        except Interrupted:
            pass
        config = dict(config, interrupt=False)  # the same edit again, from the start
    result = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    return result.frames.float()


def compiled_pipeline():
    pipe = tiny_vace_pipeline(tiny_vace_transformer(num_layers=4))
    pipe.transformer = torch.compile(pipe.transformer, backend="hetcache", options=OPTIONS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_output(i: int, path: str) -> torch.Tensor:
    subprocess.run([sys.executable, __file__, "--one", str(i), "--out", path], check=True, cwd=REPO_ROOT,
                   capture_output=True, timeout=1800)
    return torch.load(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-process reference runs")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.one is not None:  # a fresh process computing one run
        torch.save(edit(compiled_pipeline(), run_config(args.one)), args.out)
        return
    pipe = compiled_pipeline()
    rows, records = [], []
    start = time.perf_counter()
    for i in tqdm(range(args.runs), desc="runs"):
        config = run_config(i)
        output = edit(pipe, config)
        stats = hc.stats(pipe.transformer)
        record = {
            "run": i, **{k: config[k] for k in ("height", "width", "frames", "steps", "interrupt")},
            "box": config["box"], "live_bytes": live_tensor_bytes(), "cache_bytes": stats.cache_bytes,
            "graphs": stats.graphs, "variant_compiles": sum(stats.compile_counts.values()),
            "steps_by_kind": dict(stats.steps), "fallbacks": len(stats.fallback_reasons),
        }
        if not args.no_fresh:
            fresh = fresh_output(i, str(REPO_ROOT / "benchmarks" / "results" / ".soak_fresh.pt"))
            record["max_diff_vs_fresh"] = float((output - fresh).abs().max())
        records.append(record)
        rows.append([i, f"{config['height']}x{config['width']}x{config['frames']}", config["steps"],
                     "yes" if config["interrupt"] else "", f"{record['live_bytes'] / 2**20:.2f}",
                     f"{record['cache_bytes'] / 2**20:.2f}", record["graphs"], record["variant_compiles"],
                     "-" if args.no_fresh else f"{record['max_diff_vs_fresh']:.1e}"])
    (REPO_ROOT / "benchmarks" / "results" / ".soak_fresh.pt").unlink(missing_ok=True)
    (REPO_ROOT / "benchmarks" / "results" / "soak.json").write_text(json.dumps(records, indent=1))
    total = hc.stats(pipe.transformer)
    write_table(
        "soak", "Many pipeline runs in one process",
        ["run", "size (HxWxF)", "steps", "interrupted first", "live tensors MiB", "hetcache caches MiB",
         "Dynamo graphs", "variant compiles", "max |diff| vs fresh process"], rows,
        header=[utc_now(), machine_description(), source_description(), f"`{command_line()}`",
                f"options {OPTIONS}; {args.runs} runs in {time.perf_counter() - start:.0f} s"],
        notes=[f"Totals: {total.summary()}.",
               "Live tensors: bytes of all real tensor storages alive after the run (model weights included). "
               "A run that starts frees the caches runs of other shapes left behind. Dynamo switches to a "
               "dynamic-shape graph at the second resolution; hetcache specializes it per shape, so each shape "
               "compiles its variants once more the first time the dynamic graph meets it."])


if __name__ == "__main__":
    main()
