"""End-to-end latency of a WanVACE masked edit: eager, torch.compile, hetcache; on CPU or a GPU.

Runs the whole ``WanVACEPipeline`` call (VAE encode, the CFG denoising loop, VAE decode) with
random-weight components (``tests/models.py``; ``--size wan-1.3b`` builds the transformer from
Wan2.1-VACE-1.3B's published config, for a GPU) for each configuration:

* ``eager``: the transformer uncompiled;
* ``torch.compile``: plain ``torch.compile(backend=<inner backend>)`` (Inductor by default), the baseline;
* ``hetcache adaptive``: ``backend="hetcache"`` with default options (keys and values recomputed);
* ``hetcache adaptive, partial=False``: the same with step-level caching only (full or reuse);
* ``hetcache fixed``: a fixed schedule ``FF`` + ``RF``... that reuses about half the steps;
* ``hetcache full``: ``schedule="full"``, never reuses (measures the runtime's own overhead).

Each configuration gets its own deep copy of the transformer and a ``torch._dynamo.reset()``;
a first run compiles and warms up (not timed), then ``--repeats`` runs are timed and the median
is reported, both for the whole call and for the transformer calls alone (the denoising loop's
model time, measured with forward hooks). The FLOPs of the same run are counted on the meta
device (``benchmarks/flops.py``) from the step kinds and |S| each config used, so the wall-clock
speedup can be compared with the FLOPs reduction on the same config. Output differences are
measured against the eager output video.

    python benchmarks/latency.py             # writes benchmarks/results/latency.md
    python benchmarks/latency.py --quick     # smoke run, writes benchmarks/results/latency_quick.md
    python benchmarks/latency.py --medium    # dim 256, 768 tokens, writes benchmarks/results/latency_medium.md
    python benchmarks/latency.py --size wan-1.3b --device cuda --dtype bfloat16   # writes latency_gpu.md

On a GPU every timer synchronizes the device first. The table gives each configuration's peak
memory: its copy of the transformer plus the most allocated during one run (activations and
hetcache's caches); on a GPU from ``torch.cuda.max_memory_allocated`` over its runs, on the CPU
from the allocator's events in ``torch.profiler`` over one extra, untimed run. ``--configs`` picks
configurations (the cache plans ``stored`` (keys and values as computed, the default before
2026-12-06), ``recompute``, ``float8``, ``float8-recompute`` and ``host`` run only when named) and
``--deadline`` skips the ones that would start after it; the table is rewritten after each
configuration, so a run stopped early still leaves its rows (the FLOPs columns are filled at the end).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import inspect
import logging
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from common import (
    command_line,
    edit_inputs,
    machine_description,
    source_description,
    tiny_vace_pipeline,
    tiny_vace_transformer,
    utc_now,
    write_table,
)

import hetcache_compile as hc
from hetcache_compile.passes.graph_utils import tensor_bytes

log = logging.getLogger("benchmarks.latency")

@dataclass(frozen=True)
class Size:
    """A model and input size: ``model`` holds ``tiny_vace_transformer`` kwargs, or None for Wan2.1-VACE-1.3B."""

    results: str   # benchmarks/results/<results>.md
    model: dict | None
    inputs: dict   # edit_inputs kwargs


SIZES = {
    # "Small WanVACE": big enough that the transformer blocks dominate a pipeline call on CPU.
    "small": Size("latency", dict(num_layers=8, vace_layers=(0, 2, 4, 6), heads=4, head_dim=32, text_dim=64,
                                  ffn_dim=256), dict(frames=9, height=128, width=128, text_dim=64)),  # 192 tokens
    # dim 256 and 768 tokens, where matmuls and attention rather than per-op overhead dominate a call.
    "medium": Size("latency_medium", dict(num_layers=8, vace_layers=(0, 2, 4, 6), heads=8, head_dim=32, text_dim=64,
                                          ffn_dim=512), dict(frames=9, height=256, width=256, text_dim=64)),
    # the test suite's tiny defaults: a smoke run.
    "quick": Size("latency_quick", dict(num_layers=4, vace_layers=(0, 2), heads=2, head_dim=12, text_dim=32,
                                        ffn_dim=32), dict(frames=5, height=32, width=32, text_dim=32)),
    # the real 1.3B transformer (random weights) on 33 frames at 480 x 832: 9 x 30 x 52 = 14,040 tokens.
    "wan-1.3b": Size("latency_gpu", None, dict(frames=33, height=480, width=832, text_len=512, text_dim=4096)),
}
CONFIG_KEYS = ("eager", "compile", "adaptive", "no-partial", "fixed", "full")
PLAN_KEYS = ("stored", "recompute", "float8", "float8-recompute", "host")  # the cache plans (issue 14): named to run
PLAN_OPTIONS = {"stored": {"recompute_kv": False}, "recompute": {"recompute_kv": True},
                "float8": {"cache_dtype": "float8_e4m3fn"},
                "float8-recompute": {"cache_dtype": "float8_e4m3fn", "recompute_kv": True},
                "host": {"cache_device": "cpu"}}

LETTER = {"full": "F", "partial": "P", "reuse": "R"}


def half_reuse_schedule(steps: int) -> str:
    """``FF`` then alternating ``RF``: about half the steps after the first two reuse; the last is full."""
    letters = ["F" if i < 2 or i % 2 == 1 else "R" for i in range(steps)]
    letters[-1] = "F"
    return "".join(letters)


@dataclass
class Config:
    key: str             # one of CONFIG_KEYS, for --configs
    name: str
    backend: str | None  # None: eager
    options: dict | None = None

    @property
    def is_hetcache(self) -> bool:
        return self.backend == "hetcache"


@dataclass
class Result:
    config: Config
    warmup_seconds: float = float("nan")
    seconds: list[float] = field(default_factory=list)
    output: torch.Tensor | None = None
    error: str | None = None                     # the exception that stopped this config, if any
    steps: dict[str, int] | None = None          # per run, summed over branches
    histories: dict[str, str] = field(default_factory=dict)  # branch -> "FFRF..." of the last run
    compile_seconds: float | None = None
    transformer_seconds: list[float] = field(default_factory=list)
    token_fraction: float | None = None          # |S| / N of the partial steps
    graphs: int | None = None
    fallback: str | None = None
    consistent: bool = True                      # same step kinds in every timed run
    peak_memory: float | None = None             # the copy of the transformer + the most a run allocates (bytes)
    cache_bytes: int | None = None               # the most hetcache's caches held during a run (its own count)
    plan: str | None = None                      # hetcache's cache plan
    recomputed: bool = False                     # the plan recomputes keys and values (FLOPs)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def transformer_median(self) -> float:
        return statistics.median(self.transformer_seconds) if self.transformer_seconds else float("nan")


def synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (GPU work runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class TransformerTimer:
    """Sums the wall time of the transformer's calls with forward hooks (pre: start, post: stop)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total = 0.0
        self._start = 0.0
        self._device = device
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args):
        self._start = synchronized_clock(self._device)

    def _after(self, module, args, output):
        self.total += synchronized_clock(self._device) - self._start


class CacheMeter:
    """The most hetcache's caches held after any transformer call while ``active`` (its own count,
    ``hc.stats().cache_bytes``); off during the timed runs, which it would slow down."""

    def __init__(self, module: torch.nn.Module):
        self.most = 0
        self.active = True
        module.register_forward_hook(self._after)

    def _after(self, module, args, output):
        if self.active:
            self.most = max(self.most, hc.stats(module).cache_bytes)


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()])


def profiled_peak_bytes(run: Callable[[], object]) -> int:
    """The most ``run()`` has allocated at once on the CPU above what was allocated when it started,
    from the allocator's events that ``torch.profiler`` records with ``profile_memory=True``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_pipeline(pipe, inputs: dict, steps: int) -> torch.Tensor:
    result = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    return result.frames.float().cpu()


def build_transformer(size: Size, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if size.model is not None:
        model = tiny_vace_transformer(**size.model)
    else:
        from diffusers import WanVACETransformer3DModel
        from flops import WAN_VACE_1_3B

        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: 1.3B parameters initialise slowly on a CPU
            model = WanVACETransformer3DModel(**WAN_VACE_1_3B).eval()
    model.to(device=device, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, parameter in model.named_parameters():  # as from_pretrained(torch_dtype=...) keeps them
        if any(part in keep for part in name.split(".")):
            parameter.data = parameter.data.float()
    return model


def device_inputs(inputs: dict, device: torch.device) -> dict:
    """The pipeline inputs with tensors (the text embeddings) on ``device``: pipelines leave them where they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def benchmark(config: Config, base: torch.nn.Module, inputs: dict, steps: int, repeats: int) -> Result:
    device = next(base.parameters()).device
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    module = copy.deepcopy(base)
    if config.backend is None:
        model = module
    else:
        model = torch.compile(module, backend=config.backend, options=config.options)
    pipe = tiny_vace_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    timer = TransformerTimer(model, device)
    caches = CacheMeter(model) if config.is_hetcache else None

    log.info("[%s] compile + warm-up run ...", config.name)
    start = synchronized_clock(device)
    output = run_pipeline(pipe, inputs, steps)
    if config.is_hetcache:
        hc.finish_compiling(model)  # the variants compile in the background: time the compiled ones
    warmup = synchronized_clock(device) - start
    log.info("[%s] warm-up run took %.1f s", config.name, warmup)

    if caches is not None:
        caches.active = False
    seconds: list[float] = []
    transformer_seconds: list[float] = []
    per_run_steps: list[dict[str, int]] = []
    for repeat in range(repeats):
        if config.is_hetcache:
            hc.reset(model)
            before = dict(hc.stats(model).steps)
        timer.total = 0.0
        start = synchronized_clock(device)
        output = run_pipeline(pipe, inputs, steps)
        seconds.append(synchronized_clock(device) - start)
        transformer_seconds.append(timer.total)
        if config.is_hetcache:
            after = hc.stats(model).steps
            per_run_steps.append({kind: after[kind] - before[kind] for kind in after})
        log.info("[%s] run %d/%d: %.3f s", config.name, repeat + 1, repeats, seconds[-1])

    result = Result(config, warmup, seconds, output)
    result.transformer_seconds = transformer_seconds
    if config.is_hetcache:
        plans = [rt.plan for rt in hc.runtimes(model) if getattr(rt, "plan", None) is not None]
        result.plan = ", ".join(sorted({plan.name for plan in plans})) or "none (no partial steps)"
        result.recomputed = any(plan.recompute for plan in plans)
        stats = hc.stats(model)
        result.token_fraction = stats.token_fraction
        result.steps = per_run_steps[-1]
        result.consistent = all(s == per_run_steps[0] for s in per_run_steps)
        result.histories = {name: "".join(LETTER[k] for k in branch.history) for name, branch in stats.branches.items()}
        result.compile_seconds = sum(stats.compile_seconds.values())
        result.graphs = stats.graphs
        result.fallback = stats.fallback_reason
    if device.type == "cuda":
        result.peak_memory = torch.cuda.max_memory_allocated(device) - memory_before
    else:  # one more run, from no caches, as the timed runs start after hc.reset
        if config.is_hetcache:
            hc.reset(model)
            caches.active = True
        gc.collect()
        one_run = functools.partial(run_pipeline, pipe, inputs, steps)
        result.peak_memory = module_bytes(module) + profiled_peak_bytes(one_run)
    if caches is not None:
        result.cache_bytes = caches.most
    del pipe, model, module
    return result


def flops_reductions(base: torch.nn.Module, input_kwargs: dict, results: list[Result], steps: int) -> dict[str, float]:
    """FLOPs reduction of each config (by name) against full compute, counted on the meta device for this size."""
    from flops import variant_flops

    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    frames, height, width = input_kwargs["frames"], input_kwargs["height"], input_kwargs["width"]
    patch = config["patch_size"]
    tokens = ((frames - 1) // 4 + 1) // patch[0] * (height // 8 // patch[1]) * (width // 8 // patch[2])
    sizes = {r.config.name: round(r.token_fraction * tokens) for r in results if r.token_fraction}
    text_len = input_kwargs.get("text_len", inspect.signature(edit_inputs).parameters["text_len"].default)
    counted = variant_flops(config, frames, height, width, list(sizes.values()) or [tokens], text_len=text_len)
    recomputes = {r.config.name for r in results if r.recomputed and r.config.name in sizes}
    recomputed = (variant_flops(config, frames, height, width, [sizes[name] for name in recomputes],
                                text_len=text_len, recompute=True) if recomputes else None)
    full_run = 2 * steps * counted.full
    reductions = {}
    for r in results:
        if r.error is not None:
            continue
        counted_for = recomputed if r.config.name in recomputes else counted
        kinds = r.steps or {"full": 2 * steps, "partial": 0, "reuse": 0}
        partial = counted_for.partial.get(sizes.get(r.config.name, tokens), counted.full)
        probe = counted.probe if r.config.is_hetcache else 0
        run = (kinds["full"] * counted.full + kinds["partial"] * partial
               + kinds["reuse"] * counted.reuse + sum(kinds.values()) * probe)
        reductions[r.config.name] = full_run / run
    return reductions


def make_configs(inner: str, steps: int, keys: Sequence[str]) -> list[Config]:
    fixed = half_reuse_schedule(steps)
    configs = [
        Config("eager", "eager", None),
        Config("compile", f"torch.compile ({inner})", inner),
        Config("adaptive", "hetcache adaptive", "hetcache", {"inner_backend": inner}),
        Config("no-partial", "hetcache adaptive, partial=False", "hetcache",
               {"partial": False, "inner_backend": inner}),
        Config("fixed", f"hetcache fixed {fixed}", "hetcache", {"schedule": fixed, "inner_backend": inner}),
        Config("full", "hetcache full", "hetcache", {"schedule": "full", "inner_backend": inner}),
    ]
    configs += [Config(key, "hetcache adaptive, " + ", ".join(f"{k}={v!r}" for k, v in options.items()), "hetcache",
                       {**options, "inner_backend": inner}) for key, options in PLAN_OPTIONS.items()]
    return [c for c in configs if c.key in keys]


def run_configs(configs: list[Config], base: torch.nn.Module, inputs: dict, steps: int, repeats: int,
                deadline: float | None, on_result: Callable[[list[Result]], None]) -> list[Result]:
    """Benchmark each config in turn; a failure or a passed deadline becomes that config's error row."""
    results: list[Result] = []
    start = time.perf_counter()
    for config in configs:
        elapsed = time.perf_counter() - start
        if deadline is not None and elapsed > deadline:
            log.warning("[%s] skipped: %.0f s elapsed, past --deadline %.0f s", config.name, elapsed, deadline)
            results.append(Result(config, error=f"skipped: not started by --deadline {deadline:.0f} s"))
            continue
        try:
            results.append(benchmark(config, base, inputs, steps, repeats))
        except Exception as error:  # keep measuring the other configs; the table shows the error
            log.error("[%s] failed:\n%s", config.name, traceback.format_exc())
            first_line = (str(error).splitlines() or [""])[0][:200]
            results.append(Result(config, error=f"{type(error).__name__}: {first_line}"))
        on_result(results)
    return results


COLUMNS = ["config", "median s/run", "min s/run", "speedup vs torch.compile", "transformer s/run",
           "transformer speedup", "FLOPs reduction", "speedup / FLOPs reduction", "steps full/partial/reuse",
           "max abs diff vs eager", "mean abs diff vs eager", "warm-up run s (compile)", "peak memory MiB",
           "peak vs torch.compile", "cache plan (caches MiB)"]


def table_rows(results: list[Result], reductions: dict[str, float], steps: int) -> list[list[str]]:
    """One row per config; ratios are against the torch.compile row (else the first row) of the same run."""
    na = "n/a"
    reference = next((r.output for r in results if r.config.key == "eager" and r.error is None), None)
    baseline = next((r for r in results if r.config.key == "compile" and r.error is None),
                    next((r for r in results if r.error is None), None))
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.config.name, f"ERROR: {r.error}"] + [na] * (len(COLUMNS) - 2))
            continue
        if reference is not None:
            diff = (r.output - reference).abs()
            max_diff, mean_diff = f"{diff.max().item():.2e}", f"{diff.mean().item():.2e}"
        else:
            max_diff = mean_diff = na
        warmup = f"{r.warmup_seconds:.1f}"
        if r.compile_seconds is not None:
            warmup += f" (variants {r.compile_seconds:.1f})"
        if r.steps is not None:
            steps_cell = "/".join(str(r.steps[k]) for k in ("full", "partial", "reuse"))
            if not r.consistent:
                steps_cell += " (varied)"
        else:
            steps_cell = f"{2 * steps}/0/0"
        model_speedup = baseline.transformer_median / r.transformer_median
        reduction = reductions.get(r.config.name)
        if reduction and baseline.config.name in reductions:  # against the baseline row, like the speedups
            reduction /= reductions[baseline.config.name]
        row = [r.config.name, f"{r.median:.3f}", f"{min(r.seconds):.3f}", f"{baseline.median / r.median:.2f}x",
               f"{r.transformer_median:.3f}", f"{model_speedup:.2f}x",
               f"{reduction:.2f}x" if reduction else na,
               f"{100 * model_speedup / reduction:.0f}%" if reduction else na,
               steps_cell, max_diff, mean_diff, warmup]
        row += [f"{r.peak_memory / 2**20:.0f}", f"{r.peak_memory / baseline.peak_memory:.2f}x",
                f"{r.plan} ({r.cache_bytes / 2**20:.1f})" if r.plan else na]
        rows.append(row)
    return rows


def table_notes(results: list[Result], inner: str, gpu: bool) -> list[str]:
    notes = ["Steps are transformer calls of one timed run, summed over the cond and uncond branches.",
             "Speedup is the torch.compile median divided by the config's median, both measured in this run.",
             "Transformer s/run sums the transformer calls of a run (the denoising loop's model time, no VAE).",
             "FLOPs reduction: FLOPs of the torch.compile run over the config's, counted on the meta device for "
             "this model and input size from the step kinds and |S| the config used; the last ratio is the transformer "
             "speedup over the FLOPs reduction (100%: every FLOP saved shows in wall-clock time).",
             "Output diffs compare the decoded video in [0, 1] with the eager run."]
    if gpu:
        notes.append("Peak memory: the most GPU memory allocated during the config (its copy of the transformer, "
                     "activations, hetcache's caches) above what was allocated before it (the base model), over its "
                     "compile, warm-up and timed runs; timers synchronize the GPU.")
    else:
        notes.append("Peak memory: the config's copy of the transformer plus the most the CPU allocator held at once "
                     "above the start of one more run (untimed, under torch.profiler's memory events; hetcache from "
                     "no caches, as each timed run starts): activations, the VAE's and hetcache's caches.")
        notes.append("The CPU is shared: a min far below the median means other processes interfered.")
    notes.append("Cache plan: the one each hetcache config ran; in brackets the most its caches held after any "
                 "transformer call of the untimed runs (hetcache's own count, `stats().cache_bytes`).")
    notes += ["", "Step kinds per branch (last timed run):", ""]
    for r in results:
        for branch, history in r.histories.items():
            notes.append(f"- {r.config.name}, {branch}: `{history}`")
        if r.graphs is not None and r.graphs != 1:
            notes.append(f"- {r.config.name}: {r.graphs} compiled graphs")
        if r.fallback:
            notes.append(f"- {r.config.name}: FELL BACK to plain {inner}: {r.fallback}")
        if r.error and r.error.startswith("skipped"):
            notes.append(f"- {r.config.name}: {r.error}")
        elif r.error:
            notes.append(f"- {r.config.name}: failed with {r.error} (traceback in the log)")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per run (default 20; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per config (default 3; 1 with --quick)")
    parser.add_argument("--inner-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="hetcache's inner compiler, also the backend of the plain torch.compile baseline")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="model and input size (default small)")
    parser.add_argument("--quick", action="store_true", help="same as --size quick: a smoke run")
    parser.add_argument("--medium", action="store_true", help="same as --size medium: dim 256, 768 tokens")
    parser.add_argument("--device", default="cpu", help="torch device of the transformer and VAE (e.g. cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the transformer's dtype (the VAE stays float32, as in diffusers' Wan examples)")
    parser.add_argument("--configs", default=",".join(CONFIG_KEYS),
                        help=f"comma-separated subset of {', '.join(CONFIG_KEYS + PLAN_KEYS)} (default: "
                             f"{', '.join(CONFIG_KEYS)}, in that order; the cache plans only when named)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no further config starts (those left become 'skipped' rows)")
    parser.add_argument("--name", default=None,
                        help="results file benchmarks/results/<name>.md (default: by size, e.g. latency)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--note", action="append", default=[], help="extra line for the results header (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show hetcache_compile's INFO logs")
    args = parser.parse_args(argv)
    args.size = args.size or ("quick" if args.quick else "medium" if args.medium else "small")
    args.steps = args.steps or (4 if args.size == "quick" else 20)
    args.repeats = args.repeats or (1 if args.size == "quick" else 3)
    args.configs = [key.strip() for key in args.configs.split(",") if key.strip()]
    unknown = sorted(set(args.configs) - set(CONFIG_KEYS + PLAN_KEYS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIG_KEYS + PLAN_KEYS)}")
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = SIZES[args.size]
    name = args.name or size.results
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hetcache_compile").setLevel(logging.INFO if args.verbose else logging.WARNING)

    machine = machine_description()
    source = source_description()  # before the run: the other files may change while it runs
    load_before = os.getloadavg()
    if not gpu and load_before[0] > 0.5 and torch.get_num_threads() > 1:
        log.warning("load average %.2f: other processes are running; eager PyTorch with one thread per core "
                    "can slow down 100x when a core is taken, consider --threads 1", load_before[0])
    log.info("machine: %s", machine)
    log.info("size %s (%s), inputs %s, %d steps, %d timed runs per config", args.size,
             size.model or "Wan2.1-VACE-1.3B config", size.inputs, args.steps, args.repeats)
    base = build_transformer(size, device, dtype)
    inputs = device_inputs(edit_inputs(**size.inputs), device)
    configs = make_configs(args.inner_backend, args.steps, args.configs)
    model_line = (f"`tiny_vace_transformer({', '.join(f'{k}={v}' for k, v in size.model.items())})`"
                  if size.model is not None else "`WanVACETransformer3DModel(**flops.WAN_VACE_1_3B)` (the 1.3B config)")

    def write(results: list[Result], reductions: dict[str, float], total: float) -> None:
        header = [
            f"machine: {machine}",
            f"date: {utc_now()}",
            f"command: `{command_line()}`",
            source,
            f"model: {model_line}, random weights, {args.dtype}, on {device.type}",
            f"inputs: `edit_inputs({', '.join(f'{k}={v}' for k, v in size.inputs.items())})`, "
            f"{args.steps} steps, guidance_scale=5.0 (CFG: 2 transformer calls per step)",
            f"timing: whole `WanVACEPipeline.__call__` (VAE encode/decode included), median of {args.repeats} "
            f"run(s) after one untimed compile + warm-up run; inner backend `{args.inner_backend}`",
            f"load average (1 min) before/now: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
            f"wall time so far {total:.0f} s",
            *args.note,
        ]
        rows = table_rows(results, reductions, args.steps)
        title = f"Latency: WanVACE masked edit, size {args.size}, on {'GPU' if gpu else 'CPU'}"
        write_table(name, title, COLUMNS, rows, header, table_notes(results, args.inner_backend, gpu))

    total_start = time.perf_counter()
    results = run_configs(configs, base, inputs, args.steps, args.repeats, args.deadline,
                          lambda partial: write(partial, {}, time.perf_counter() - total_start))
    log.info("counting FLOPs on the meta device ...")
    write(results, flops_reductions(base, size.inputs, results, args.steps), time.perf_counter() - total_start)


if __name__ == "__main__":
    main()
