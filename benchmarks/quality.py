"""Quality vs FLOPs on the trained proxy: full compute, hetcache settings, the peers, step skipping.

Each held-out clip is one video: every method samples it with the Euler flow-matching loop of
``benchmarks/proxy/evaluate.py`` (20 steps, shift 3, one branch, no CFG, the same noise), and is
scored against the full-compute output and against the ground truth (PSNR and SSIM, inside the
mask and over the whole clip, torchmetrics; ``quality_metrics.py`` says how). The methods and
settings are in ``peers.py``: hetcache (compiled, inner backend ``aot_eager`` for quality), diffusers'
FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer and MagCache, cache-dit's DBCache (hooks,
eager), and a plain step-skipping schedule. A method that fails is a row saying why.

hetcache runs one warm-up clip first, uncounted: it compiles the variants and shows the runtime how
many calls a run has (so that each run's last call is full, as from a user's second video on).

FLOPs: peers and step skipping are counted on their real runs with FlopCounterMode; hetcache's
runs are priced from the calls it made (``hc.stats``: full / partial at each |S| / reuse, plus the
probe and selection) with meta-device counts of each variant; both ways give the same number for
full compute (checked at every run, in the notes). Writes ``benchmarks/results/quality.md``,
``quality.json`` and the Pareto plot ``quality.png``.

    python benchmarks/quality.py --threads 1               # 16 clips, 11-17 min on 1 shared CPU thread
    python benchmarks/quality.py --threads 1 --clips 64    # more clips
    python benchmarks/quality.py --threads 1 --steps 50 --name quality_50   # Wan's default step count
    python benchmarks/quality.py --proxy scenes --only hetcache skipping --name quality_scenes   # second proxy
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import quality_report  # noqa: E402
from flops import recomputes_on_wan, variant_flops  # noqa: E402
from proxy.model import PROXY_CONFIG  # noqa: E402
from proxy.specs import PROXIES, ProxySpec, get_proxy  # noqa: E402
from quality_metrics import FlopCount, clip_scores, hetcache_flops  # noqa: E402

import hetcache_compile as hc  # noqa: E402
from hetcache_compile import HetCacheConfig  # noqa: E402


@dataclass
class Result:
    """What one method produced on the clips; ``flops`` is None until priced (hetcache) or on failure."""

    method: peers.Method
    outputs: list = field(default_factory=list)
    flops: int | None = None
    seconds: list = field(default_factory=list)
    error: str = ""
    steps: dict = field(default_factory=dict)
    fractions: list = field(default_factory=list)
    compiles: dict = field(default_factory=dict)


def run_method(method: peers.Method, clips: list, shift: float, latency_clips: int) -> Result:
    """Sample every clip with ``method``; count FLOPs (peers) or record hetcache's calls; time a few clips."""
    result = Result(method)
    try:
        runner = method.build()
        steps = method.steps or peers.STEPS
        total = 0
        if method.hetcache:  # steady state: the warm-up run compiles and shows how long runs are
            peers.euler_sample(runner, *clips[0], steps, shift)
            before = hc.stats(runner.model)
            warmup_steps, warmup_fractions = dict(before.steps), _fractions(before)
        for x0, mask in clips:
            start = time.perf_counter()
            if method.hetcache:
                result.outputs.append(peers.euler_sample(runner, x0, mask, steps, shift))
            else:
                with FlopCount() as count:
                    result.outputs.append(peers.euler_sample(runner, x0, mask, steps, shift))
                total += count.total
            result.seconds.append(time.perf_counter() - start)
        if method.hetcache:
            stats = hc.stats(runner.model)
            result.steps = {kind: count - warmup_steps.get(kind, 0) for kind, count in stats.steps.items()}
            result.fractions = _fractions(stats)[len(warmup_fractions):]  # one branch: its list only grows
            result.compiles = dict(stats.compile_counts)
        else:
            result.flops = total
            result.seconds = [_timed(runner, x0, mask, steps, shift) for x0, mask in clips[:latency_clips]]
    except Exception as error:  # a failing peer is a result
        message = (str(error) or repr(error)).splitlines() or [""]
        result.error = f"{type(error).__name__}: {message[0][:200]}"
        traceback.print_exc()
    return result


def _fractions(stats: hc.HetCacheStats) -> list[float]:
    return [f for b in stats.branches.values() for f in b.token_fractions]


def _timed(runner, x0, mask, steps: int, shift: float) -> float:
    start = time.perf_counter()
    peers.euler_sample(runner, x0, mask, steps, shift)
    return time.perf_counter() - start


def price_hetcache(results: list[Result], proxy: ProxySpec):
    """Price every hetcache result from meta-device counts of the proxy's variants; return the counts."""
    num_tokens = proxy.num_tokens
    _, frames, height, width = proxy.latent_shape
    sizes = sorted({round(f * num_tokens) for r in results for f in r.fractions} | {num_tokens})
    heads, head_dim = PROXY_CONFIG["num_attention_heads"], PROXY_CONFIG["attention_head_dim"]
    counts = {}
    for r in results:
        if r.method.hetcache and not r.error:
            recompute = recomputes_on_wan(HetCacheConfig.from_options(r.method.options_dict))  # costs FLOPs
            if recompute not in counts:
                counts[recompute] = variant_flops(dict(PROXY_CONFIG), 4 * (frames - 1) + 1, height * 8, width * 8,
                                                  sizes, text_len=4, recompute=recompute)
            r.flops = hetcache_flops(r.steps, r.fractions, counts[recompute], num_tokens, heads, head_dim)
    return counts.get(False) or variant_flops(dict(PROXY_CONFIG), 4 * (frames - 1) + 1, height * 8, width * 8,
                                              sizes, text_len=4)


def inductor_latency(settings: list[dict], clip: tuple, shift: float, repeats: int) -> list[list[str]]:
    """s/clip with Inductor: plain ``torch.compile`` and hetcache settings, steady state.

    The first run of ``clip`` compiles (reported apart); then ``clip`` is sampled ``repeats`` times
    (each is a new hetcache run, as the timestep goes back up) and the median is reported. One clip
    so that every sample runs at the same |S|.
    """
    rows = []
    builds = [("torch.compile (inductor), full compute", "-", peers.compiled_runner)]
    builds += [
        ("hetcache (inner inductor)", peers._describe(o), peers.hetcache_runner(o, "inductor")) for o in settings
    ]
    for name, options, build in tqdm(builds, desc="inductor latency"):
        start = time.perf_counter()
        runner = build()
        peers.euler_sample(runner, *clip, peers.STEPS, shift)
        hc.finish_compiling(runner.model)  # hetcache compiles in the background: time the compiled pieces
        warm = time.perf_counter() - start
        seconds = [_timed(runner, *clip, peers.STEPS, shift) for _ in range(repeats)]
        rows.append([name, options, f"{statistics.median(seconds):.3f}", f"{warm:.0f}", str(repeats)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="tiles", choices=sorted(PROXIES), help="which trained proxy (proxy/specs.py)")
    parser.add_argument("--clips", type=int, default=16, help="held-out clips")
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument(
        "--inner-backend",
        default="aot_eager",
        choices=("inductor", "aot_eager", "eager"),
        help="hetcache's inner backend for the quality runs",
    )
    parser.add_argument("--latency-clips", type=int, default=4, help="clips timed per method (repeats with Inductor)")
    parser.add_argument(
        "--inductor",
        nargs="*",
        default=["quality", "balanced", "fast"],
        help="hetcache presets timed with the Inductor inner backend (none: skip)",
    )
    parser.add_argument("--only", nargs="*", help="run only methods whose family contains one of these words")
    parser.add_argument("--settings", type=json.loads, default=None,
                        help="hetcache settings to compare instead of peers.HETCACHE_SETTINGS, as a JSON list of "
                             "option dicts (no uniform-context ablation then)")
    parser.add_argument("--steps", type=int, default=peers.STEPS, help="Euler steps of full compute")
    parser.add_argument("--name", default="quality", help="results files benchmarks/results/<name>.{md,json,png}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers.STEPS = args.steps  # read at call time by the samplers and the cache hooks' step counts
    proxy = get_proxy(args.proxy)
    peers.WEIGHTS = proxy.weights_dir
    start = time.time()
    x0s, masks, _ = proxy.data.make_batch(proxy.data.heldout_seeds(args.clips))
    clips = [(x0s[i : i + 1], masks[i : i + 1]) for i in range(args.clips)]
    calib_x0, calib_mask, _ = proxy.data.make_batch(proxy.data.train_seeds(0, 1))
    ratios = peers.magcache_ratios(calib_x0, calib_mask, args.shift, args.steps)
    methods = peers.default_methods(args.inner_backend, ratios, args.steps, args.settings)
    if args.only:
        methods = methods[:1] + [m for m in methods[1:] if any(w.lower() in m.family.lower() for w in args.only)]
    results = [run_method(m, clips, args.shift, args.latency_clips) for m in tqdm(methods, desc="methods")]
    try:
        counted = price_hetcache(results, proxy)
    except Exception as error:  # keep the peers' results even if the meta-device count breaks
        traceback.print_exc()
        counted = None
        for r in results:
            if r.method.hetcache and not r.error:
                r.error = f"FLOPs pricing failed: {type(error).__name__}: {str(error)[:150]}"
    latency = (
        inductor_latency([{"preset": p} for p in args.inductor], clips[0], args.shift, args.latency_clips)
        if args.inductor
        else []
    )
    truths, masks_list = [x0 for x0, _ in clips], [m for _, m in clips]
    reference = results[0].outputs
    scored = []
    for r in results:
        if r.error:
            scored.append((r, None, None))
            continue
        scored.append(
            (
                r,
                clip_scores(r.outputs, reference, truths, masks_list),
                clip_scores(r.outputs, truths, truths, masks_list),
            )
        )
    run = dict(
        clips=args.clips,
        steps=args.steps,
        name=args.name,
        shift=args.shift,
        inner=args.inner_backend,
        seconds=time.time() - start,
        full_meta=counted.full * peers.STEPS * args.clips if counted else 0,
        full_counted=results[0].flops,
        ratios=ratios,
        num_tokens=proxy.num_tokens,
        proxy=proxy.name,
        latent_shape=list(proxy.latent_shape),
        weights=str(proxy.weights_dir.relative_to(Path(__file__).resolve().parent.parent)),
    )
    quality_report.write(scored, latency, run)


if __name__ == "__main__":
    main()
