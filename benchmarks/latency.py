"""End-to-end latency of a small WanVACE masked edit on CPU: eager, torch.compile, hetcache.

Runs the whole ``WanVACEPipeline`` call (VAE encode, the CFG denoising loop, VAE decode) with
random-weight components from ``tests/models.py`` for each configuration:

* ``eager``: the transformer uncompiled;
* ``torch.compile``: plain ``torch.compile(backend=<inner backend>)`` (Inductor by default), the baseline;
* ``hetcache adaptive``: ``backend="hetcache"`` with default options;
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
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import time
import traceback
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

log = logging.getLogger("benchmarks.latency")

# "Small WanVACE": big enough that the transformer blocks dominate a pipeline call on CPU.
SMALL_MODEL = dict(num_layers=8, vace_layers=(0, 2, 4, 6), heads=4, head_dim=32, text_dim=64, ffn_dim=256)
SMALL_INPUTS = dict(frames=9, height=128, width=128, text_dim=64)  # 3 x 8 x 8 = 192 tokens
# --medium: dim 256 and 768 tokens, where matmuls and attention rather than per-op overhead dominate a call.
MEDIUM_MODEL = dict(num_layers=8, vace_layers=(0, 2, 4, 6), heads=8, head_dim=32, text_dim=64, ffn_dim=512)
MEDIUM_INPUTS = dict(frames=9, height=256, width=256, text_dim=64)  # 3 x 16 x 16 = 768 tokens
# --quick: the test suite's tiny defaults.
QUICK_MODEL = dict(num_layers=4, vace_layers=(0, 2), heads=2, head_dim=12, text_dim=32, ffn_dim=32)
QUICK_INPUTS = dict(frames=5, height=32, width=32, text_dim=32)
# size -> (results file name, model kwargs, input kwargs)
SIZES = {
    "small": ("latency", SMALL_MODEL, SMALL_INPUTS),
    "medium": ("latency_medium", MEDIUM_MODEL, MEDIUM_INPUTS),
    "quick": ("latency_quick", QUICK_MODEL, QUICK_INPUTS),
}

LETTER = {"full": "F", "partial": "P", "reuse": "R"}


def half_reuse_schedule(steps: int) -> str:
    """``FF`` then alternating ``RF``: about half the steps after the first two reuse; the last is full."""
    letters = ["F" if i < 2 or i % 2 == 1 else "R" for i in range(steps)]
    letters[-1] = "F"
    return "".join(letters)


@dataclass
class Config:
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

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def transformer_median(self) -> float:
        return statistics.median(self.transformer_seconds) if self.transformer_seconds else float("nan")


class TransformerTimer:
    """Sums the wall time of the transformer's calls with forward hooks (pre: start, post: stop)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args):
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self.total += time.perf_counter() - self._start


def run_pipeline(pipe, inputs: dict, steps: int) -> torch.Tensor:
    result = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    return result.frames.float()


def benchmark(config: Config, base: torch.nn.Module, inputs: dict, steps: int, repeats: int) -> Result:
    torch._dynamo.reset()
    gc.collect()
    module = copy.deepcopy(base)
    if config.backend is None:
        model = module
    else:
        model = torch.compile(module, backend=config.backend, options=config.options)
    pipe = tiny_vace_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    timer = TransformerTimer(model)

    log.info("[%s] compile + warm-up run ...", config.name)
    start = time.perf_counter()
    output = run_pipeline(pipe, inputs, steps)
    warmup = time.perf_counter() - start
    log.info("[%s] warm-up run took %.1f s", config.name, warmup)

    seconds: list[float] = []
    transformer_seconds: list[float] = []
    per_run_steps: list[dict[str, int]] = []
    for repeat in range(repeats):
        if config.is_hetcache:
            hc.reset(model)
            before = dict(hc.stats(model).steps)
        timer.total = 0.0
        start = time.perf_counter()
        output = run_pipeline(pipe, inputs, steps)
        seconds.append(time.perf_counter() - start)
        transformer_seconds.append(timer.total)
        if config.is_hetcache:
            after = hc.stats(model).steps
            per_run_steps.append({kind: after[kind] - before[kind] for kind in after})
        log.info("[%s] run %d/%d: %.3f s", config.name, repeat + 1, repeats, seconds[-1])

    result = Result(config, warmup, seconds, output)
    result.transformer_seconds = transformer_seconds
    if config.is_hetcache:
        stats = hc.stats(model)
        result.token_fraction = stats.token_fraction
        result.steps = per_run_steps[-1]
        result.consistent = all(s == per_run_steps[0] for s in per_run_steps)
        result.histories = {name: "".join(LETTER[k] for k in branch.history) for name, branch in stats.branches.items()}
        result.compile_seconds = sum(stats.compile_seconds.values())
        result.graphs = stats.graphs
        result.fallback = stats.fallback_reason
    del pipe, model, module
    return result


def run_flops(base: torch.nn.Module, input_kwargs: dict, results: list[Result], steps: int) -> dict[str, float]:
    """FLOPs of one run of each config (by name), counted on the meta device for this model and input size."""
    from flops import variant_flops

    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    frames, height, width = input_kwargs["frames"], input_kwargs["height"], input_kwargs["width"]
    patch = config["patch_size"]
    tokens = ((frames - 1) // 4 + 1) // patch[0] * (height // 8 // patch[1]) * (width // 8 // patch[2])
    sizes = {r.config.name: round(r.token_fraction * tokens) for r in results if r.token_fraction}
    text_len = inputs_text_len(input_kwargs)
    counted = variant_flops(config, frames, height, width, list(sizes.values()) or [tokens], text_len=text_len)
    totals = {}
    for r in results:
        if r.error is not None:
            continue
        kinds = r.steps or {"full": 2 * steps, "partial": 0, "reuse": 0}
        partial = counted.partial.get(sizes.get(r.config.name, tokens), counted.full)
        probe = counted.probe if r.config.is_hetcache else 0
        totals[r.config.name] = (kinds["full"] * counted.full + kinds["partial"] * partial
                                 + kinds["reuse"] * counted.reuse + sum(kinds.values()) * probe)
    return totals


def inputs_text_len(input_kwargs: dict) -> int:
    return edit_inputs(**input_kwargs)["prompt_embeds"].shape[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per run (default 20; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per config (default 3; 1 with --quick)")
    parser.add_argument("--inner-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="hetcache's inner compiler, also the backend of the plain torch.compile baseline")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    parser.add_argument("--medium", action="store_true",
                        help="dim 256, 768 tokens (writes latency_medium.md): compute rather than per-op overhead")
    parser.add_argument("--name", default=None,
                        help="results file benchmarks/results/<name>.md (default: by size, e.g. latency)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--note", action="append", default=[], help="extra line for the results header (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show hetcache_compile's INFO logs")
    args = parser.parse_args(argv)

    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    if steps < 2 or repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    size = "quick" if args.quick else "medium" if args.medium else "small"
    default_name, model_kwargs, input_kwargs = SIZES[size]
    name = args.name or default_name

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hetcache_compile").setLevel(logging.INFO if args.verbose else logging.WARNING)

    inner = args.inner_backend
    fixed = half_reuse_schedule(steps)
    configs = [
        Config("eager", None),
        Config(f"torch.compile ({inner})", inner),
        Config("hetcache adaptive", "hetcache", {"inner_backend": inner}),
        Config("hetcache adaptive, partial=False", "hetcache", {"partial": False, "inner_backend": inner}),
        Config(f"hetcache fixed {fixed}", "hetcache", {"schedule": fixed, "inner_backend": inner}),
        Config("hetcache full", "hetcache", {"schedule": "full", "inner_backend": inner}),
    ]

    machine = machine_description()
    source = source_description()  # before the run: the other files may change while it runs
    load_before = os.getloadavg()
    if load_before[0] > 0.5 and torch.get_num_threads() > 1:
        log.warning("load average %.2f: other processes are running; eager PyTorch with one thread per core "
                    "can slow down 100x when a core is taken, consider --threads 1", load_before[0])
    log.info("machine: %s", machine)
    log.info("model %s, inputs %s, %d steps, %d timed runs per config", model_kwargs, input_kwargs, steps, repeats)
    base = tiny_vace_transformer(**model_kwargs)
    inputs = edit_inputs(**input_kwargs)

    results: list[Result] = []
    total_start = time.perf_counter()
    for config in configs:
        try:
            results.append(benchmark(config, base, inputs, steps, repeats))
        except Exception as error:  # keep measuring the other configs; the table shows the error
            log.error("[%s] failed:\n%s", config.name, traceback.format_exc())
            first_line = (str(error).splitlines() or [""])[0][:200]
            results.append(Result(config, error=f"{type(error).__name__}: {first_line}"))
    total = time.perf_counter() - total_start
    load_after = os.getloadavg()

    flops = run_flops(base, input_kwargs, results, steps)
    reference = results[0].output
    baseline = results[1].median
    transformer_baseline = results[1].transformer_median
    na = "n/a"
    columns = ["config", "median s/run", "min s/run", "speedup vs torch.compile", "transformer s/run",
               "transformer speedup", "FLOPs reduction", "speedup / FLOPs reduction", "steps full/partial/reuse",
               "max abs diff vs eager", "mean abs diff vs eager", "warm-up run s (compile)"]
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.config.name, f"ERROR: {r.error}"] + [na] * (len(columns) - 2))
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
        speedup = f"{baseline / r.median:.2f}x" if baseline == baseline else na  # NaN: baseline failed
        model_speedup = transformer_baseline / r.transformer_median
        reduction = flops[results[1].config.name] / flops[r.config.name] if r.config.name in flops else None
        rows.append([r.config.name, f"{r.median:.3f}", f"{min(r.seconds):.3f}", speedup,
                     f"{r.transformer_median:.3f}", f"{model_speedup:.2f}x",
                     f"{reduction:.2f}x" if reduction else na,
                     f"{100 * model_speedup / reduction:.0f}%" if reduction else na,
                     steps_cell, max_diff, mean_diff, warmup])

    header = [
        f"machine: {machine}",
        f"date: {utc_now()}",
        f"command: `{command_line()}`",
        source,
        f"model: `tiny_vace_transformer({', '.join(f'{k}={v}' for k, v in model_kwargs.items())})`, "
        f"random weights, float32",
        f"inputs: `edit_inputs({', '.join(f'{k}={v}' for k, v in input_kwargs.items())})`, "
        f"{steps} steps, guidance_scale=5.0 (CFG: 2 transformer calls per step)",
        f"timing: whole `WanVACEPipeline.__call__` (VAE encode/decode included), median of {repeats} "
        f"run(s) after one untimed compile + warm-up run; inner backend `{inner}`",
        f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; total wall time {total:.0f} s",
        *args.note,
    ]
    notes = ["Steps are transformer calls of one timed run, summed over the cond and uncond branches.",
             "Speedup is the torch.compile median divided by the config's median, both measured in this run.",
             "Transformer s/run sums the transformer calls of a run (the denoising loop's model time, no VAE).",
             "FLOPs reduction: FLOPs of the torch.compile run over the config's, counted on the meta device for "
             "this model and input size from the step kinds and |S| the config used; the last ratio is the transformer "
             "speedup over the FLOPs reduction (100%: every FLOP saved shows in wall-clock time).",
             "The CPU is shared: a min far below the median means other processes interfered.",
             "Output diffs compare the decoded video in [0, 1] with the eager run.", ""]
    notes.append("Step kinds per branch (last timed run):")
    notes.append("")
    for r in results:
        for branch, history in r.histories.items():
            notes.append(f"- {r.config.name}, {branch}: `{history}`")
        if r.graphs is not None and r.graphs != 1:
            notes.append(f"- {r.config.name}: {r.graphs} compiled graphs")
        if r.fallback:
            notes.append(f"- {r.config.name}: FELL BACK to plain {inner}: {r.fallback}")
        if r.error:
            notes.append(f"- {r.config.name}: failed with {r.error} (traceback in the log)")
    write_table(name, "Latency: small WanVACE masked edit on CPU", columns, rows, header, notes)


if __name__ == "__main__":
    main()
