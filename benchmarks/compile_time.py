"""Time to the first video, cold and warm, and over a session of edits: what a user meets before any speedup.

Each measurement runs a ``WanVACEPipeline`` (random weights, ``latency.py``'s sizes) in a fresh process, as a
user's script would, and times from compiling the transformer to the returned video:

* ``cold``: an empty ``TORCHINDUCTOR_CACHE_DIR``; after the first video the process waits for hetcache's
  background compilation (``tail``, untimed), then times a second video (``steady``);
* ``warm``: a new process on the cold one's cache directory;
* ``mega`` (hetcache): a new process on an empty directory, after ``torch.compiler.load_cache_artifacts`` of what
  the cold process saved with ``torch.compiler.save_cache_artifacts``;
* ``session``: an empty directory, then 10 edits in one process (3 mask sizes, 2 resolutions, 2 step counts):
  the total wall clock, and the variant compilations hetcache counted after each edit.

Modes: ``eager``; ``compile`` (plain ``torch.compile``); ``regional`` (diffusers' ``compile_repeated_blocks()``);
``hetcache`` (``backend="hetcache"``, default options: block by block, in the background); ``regional-hetcache``
(``compile_repeated_blocks(backend="hetcache")``, which hetcache refuses); ``hetcache-sync``
(``background_compile=False``) and ``hetcache-whole`` (``piecewise=False, background_compile=False``: each
variant one graph, compiled at its first call, as before block-by-block compilation).

    python benchmarks/compile_time.py                       # medium size, CPU: writes benchmarks/results/compile_time.md
    python benchmarks/compile_time.py --size quick --steps 4 --name compile_time_quick   # smoke run
    python benchmarks/compile_time.py --size wan-1.3b --device cuda --dtype bfloat16 --steps 20 --name compile_time_gpu

Also measured (hetcache): the partial variant's pieces compiled with |S| symbolic against the same pieces with
static sizes, per call (``--kernels``), and the steady-state speed of block-by-block against whole-graph variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, command_line, edit_inputs, machine_description, source_description, utc_now
from common import tiny_vace_pipeline, write_table
from latency import SIZES, build_transformer, device_inputs, run_pipeline, synchronized_clock

MODES = ("eager", "compile", "regional", "hetcache", "regional-hetcache", "hetcache-sync", "hetcache-whole")
HETCACHE_OPTIONS = {"hetcache": {}, "regional-hetcache": {}, "hetcache-sync": {"background_compile": False},
                    "hetcache-whole": {"piecewise": False, "background_compile": False}}
BOXES = ((0.35, 0.65, 0.35, 0.65), (0.25, 0.75, 0.25, 0.75), (0.1, 0.9, 0.2, 0.8))  # about 9%, 25% and 48% of a frame


def session_edits(height: int, width: int, steps: int) -> list[dict]:
    """10 edits: 3 mask sizes, 2 resolutions (the second a quarter narrower), 2 step counts, interleaved."""
    other_width = max(16, (width * 3 // 4) // 16 * 16)
    plan = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (1, 0, 0), (1, 1, 1), (0, 0, 1), (1, 2, 0), (0, 1, 1), (1, 0, 1),
            (0, 2, 0)]
    return [{"width": (width, other_width)[r], "height": height, "box": BOXES[b], "steps": (steps, steps // 2)[s]}
            for r, b, s in plan]


# -- one process --------------------------------------------------------------------------------------------
def compiled_pipeline(mode: str, size, device: torch.device, dtype: torch.dtype):
    transformer = build_transformer(size, device, dtype)
    options = {"preset": "balanced", **HETCACHE_OPTIONS.get(mode, {})}
    if mode == "compile":
        transformer = torch.compile(transformer)
    elif mode == "regional":
        transformer.compile_repeated_blocks()
    elif mode == "regional-hetcache":
        transformer.compile_repeated_blocks(backend="hetcache", options=options)
    elif mode.startswith("hetcache"):
        transformer = torch.compile(transformer, backend="hetcache", options=options)
    pipe = tiny_vace_pipeline(transformer).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, transformer


def inductor_counters() -> dict[str, int]:
    inductor, aot = torch._dynamo.utils.counters["inductor"], torch._dynamo.utils.counters["aot_autograd"]
    return {"fx_hit": inductor["fxgraph_cache_hit"], "fx_miss": inductor["fxgraph_cache_miss"],
            "aot_hit": aot["autograd_cache_hit"], "aot_miss": aot["autograd_cache_miss"]}


def worker(args: argparse.Namespace) -> dict:
    import hetcache_compile as hc

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = SIZES[args.size]
    if args.load_artifacts:
        torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
    result: dict = {}
    with torch.no_grad():
        start = synchronized_clock(device)
        pipe, transformer = compiled_pipeline(args.mode, size, device, dtype)
        if args.measure == "session":
            result["session"], result["compiles"] = [], []
            for edit in session_edits(size.inputs["height"], size.inputs["width"], args.steps):
                inputs = device_inputs(edit_inputs(**{**size.inputs, "height": edit["height"], "width": edit["width"],
                                                      "box": edit["box"]}), device)
                run_pipeline(pipe, inputs, edit["steps"])
                result["session"].append(synchronized_clock(device) - start)
                if args.mode.startswith("hetcache"):
                    result["compiles"].append(sum(hc.stats(transformer).compile_counts.values()))
            result["counters"] = inductor_counters()
            return result
        inputs = device_inputs(edit_inputs(**size.inputs), device)
        run_pipeline(pipe, inputs, args.steps)
        result["first"] = synchronized_clock(device) - start
        result["counters_first"] = inductor_counters()
        waited = synchronized_clock(device)
        if args.mode.startswith("hetcache") or args.mode == "regional-hetcache":
            hc.finish_compiling(transformer)
        result["tail"] = synchronized_clock(device) - waited
        result["counters"] = inductor_counters()
        if args.measure == "cold":
            steady = []
            for _ in range(args.repeats):
                begin = synchronized_clock(device)
                run_pipeline(pipe, inputs, args.steps)
                steady.append(synchronized_clock(device) - begin)
            result["steady"] = statistics.median(steady)
            if args.mode.startswith("hetcache"):
                stats = hc.stats(transformer)
                result["compile_seconds"] = {k: round(v, 1) for k, v in stats.compile_seconds.items() if v}
                result["history"] = "".join(k[0].upper() for k in stats.branches.get("cond").history)
                if args.kernels:
                    result["kernels"] = symbolic_against_static(pipe, inputs, args.steps, transformer, device)
            if args.save_artifacts:
                saved = torch.compiler.save_cache_artifacts()
                if saved is not None:
                    Path(args.save_artifacts).write_bytes(saved[0])
    return result


def symbolic_against_static(pipe, inputs: dict, steps: int, transformer, device: torch.device,
                            calls: int = 5) -> dict[str, float]:
    """Seconds per call of the partial variant's pieces compiled with |S| symbolic and with |S| static, on the
    inputs of one partial step of a video."""
    import hetcache_compile as hc

    runtime = next(rt for rt in hc.runtimes(transformer) if getattr(rt, "partial", None) is not None)
    runner = runtime.partial.general.runner
    captured = []
    runner.forward = lambda *a: captured.append(a) or type(runner).forward(runner, *a)
    run_pipeline(pipe, inputs, steps)
    del runner.forward
    if not captured:
        return {}
    args = captured[0]
    static = runtime.compiler.prepare("partial-static", runtime.partial.gm, args, None)
    runtime.compiler.compile_now(static)

    def per_call(graph) -> float:
        graph(*args)
        times = []
        for _ in range(calls):
            begin = synchronized_clock(device)
            graph(*args)
            times.append(synchronized_clock(device) - begin)
        return statistics.median(times)

    index = next(p for p, dims in runtime.partial.symbolic.dims.items() if "selected" in dims.values())
    return {"symbolic": per_call(runner), "static": per_call(static.runner), "selected": int(args[index].shape[0])}


# -- the driver ---------------------------------------------------------------------------------------------
def spawn(mode: str, measure: str, cache: Path, args: argparse.Namespace, **extra) -> dict:
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--measure", measure, "--size", args.size,
               "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
               "--repeats", str(args.repeats)]
    for flag, value in extra.items():
        command += [f"--{flag.replace('_', '-')}", str(value)] if value not in (True, False) else (
            [f"--{flag.replace('_', '-')}"] if value else [])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "failed"}
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="steady-state videos timed (median)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-session", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="time symbolic against static |S| (hetcache)")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--name", default="compile_time")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--save-artifacts", help=argparse.SUPPRESS)
    parser.add_argument("--load-artifacts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="hetcache-compile-time-") as scratch:
        scratch = Path(scratch)
        for mode in args.modes.split(","):
            print(f"[{mode}] cold ...", flush=True)
            artifacts = scratch / f"{mode}.bin"
            cold = spawn(mode, "cold", scratch / mode, args, save_artifacts=artifacts, kernels=args.kernels)
            print(f"[{mode}] cold: {cold}", flush=True)
            warm = spawn(mode, "warm", scratch / mode, args) if mode != "eager" else {}
            mega = (spawn(mode, "warm", scratch / f"{mode}-mega", args, load_artifacts=artifacts)
                    if mode.startswith("hetcache") and artifacts.exists() else {})
            session = {} if args.no_session else spawn(mode, "session", scratch / f"{mode}-session", args)
            print(f"[{mode}] warm: {warm}\n[{mode}] mega: {mega}\n[{mode}] session: {session}", flush=True)
            results[mode] = {"cold": cold, "warm": warm, "mega": mega, "session": session}
            rows.append(table_row(mode, cold, warm, mega, session))
            write(args, rows, results)
    plot(args, results)


def seconds(result: dict, key: str) -> str:
    if not result:
        return "-"
    if "error" in result:
        return f"error: {result['error']}"
    value = result.get(key)
    return "-" if value is None else f"{value:.1f}"


def table_row(mode: str, cold: dict, warm: dict, mega: dict, session: dict) -> list[str]:
    total = session.get("session", [None])[-1] if session and "error" not in session else None
    compiles = session.get("compiles") or []
    return [mode, seconds(cold, "first"), seconds(cold, "tail"), seconds(warm, "first"), seconds(mega, "first"),
            seconds(cold, "steady"), "-" if total is None else f"{total:.1f}",
            " ".join(str(c) for c in compiles) or "-", cold.get("history", "-") if cold else "-"]


def write(args: argparse.Namespace, rows: list[list[str]], results: dict) -> None:
    columns = ["mode", "first video, cold (s)", "compile after it (s)", "first video, warm (s)",
               "first video, Mega-Cache (s)", "each later video (s)", "10-edit session (s)",
               "variant compilations after each edit", "cond steps of a video"]
    size = SIZES[args.size]
    header = [f"{utc_now()}; {machine_description()}", source_description(), f"command: `{command_line()}`",
              f"model: {size.model or 'Wan2.1-VACE-1.3B published config'}, random weights, {args.dtype}, "
              f"{args.device}; video {size.inputs['frames']} frames {size.inputs['height']}x{size.inputs['width']}, "
              f"{args.steps} steps, CFG 5; each cell a fresh process (WanVACEPipeline, VAE included)"]
    notes = ["Cold: an empty Inductor cache directory; time from compiling to the first video. 'compile after it': "
             "what hetcache's background compiler still had to do when the first video was back (waited for, "
             "untimed). Warm: a new process on the same directory. Mega-Cache: an empty directory after "
             "torch.compiler.load_cache_artifacts. Session: 10 edits from an empty directory (3 mask sizes, "
             "2 resolutions, 2 step counts), total seconds."]
    kernels = {mode: r["cold"].get("kernels") for mode, r in results.items() if r["cold"].get("kernels")}
    for mode, timing in kernels.items():
        notes.append(f"{mode}: partial variant per call, |S| symbolic {timing['symbolic']:.4f} s, static "
                     f"{timing['static']:.4f} s ({timing['symbolic'] / timing['static']:.3f}x)")
    write_table(args.name, "Compile cost: time to the first video and over a session", columns, rows, header, notes)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(results, indent=1))


def plot(args: argparse.Namespace, results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = list(results)
    measures = [("cold", "first", "first video, cold"), ("warm", "first", "first video, warm")]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(measures)
    for i, (where, key, label) in enumerate(measures):
        values = [results[m][where].get(key) or 0 for m in modes]
        axes[0].bar([x + i * width for x in range(len(modes))], values, width, label=label)
    axes[0].set_xticks([x + width / 2 for x in range(len(modes))], modes, rotation=30, ha="right")
    axes[0].set_ylabel("seconds")
    axes[0].legend()
    axes[0].set_title("time to the first video")
    for mode in modes:
        session = results[mode]["session"].get("session") if results[mode]["session"] else None
        if session:
            axes[1].plot(range(1, len(session) + 1), session, marker="o", label=mode)
    axes[1].set_xlabel("edits done")
    axes[1].set_ylabel("seconds since the start")
    axes[1].set_title("a session of 10 edits")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(RESULTS_DIR / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
