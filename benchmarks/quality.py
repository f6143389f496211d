"""Quality of hetcache's presets on the trained proxy model (first cut: hetcache rows only).

Each held-out clip is one video: the proxy samples it with the Euler flow-matching loop of
``benchmarks/proxy/evaluate.py`` (20 steps, one branch), once uncompiled with full compute and
once per hetcache setting. The control video changes between clips, so each clip starts a new
hetcache run by itself. Reported: in-mask PSNR against the full-compute output and against the
ground truth, and the FLOPs of a run relative to full compute (counted on the meta device for the
proxy's config, from the step kinds and |S| each setting used). The peers of issue 4 are not in
this table yet.

    python benchmarks/quality.py --clips 24
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_description, utc_now, write_table  # noqa: E402
from flops import variant_flops  # noqa: E402
from proxy.data import FRAMES, HEIGHT, WIDTH, heldout_seeds, make_batch  # noqa: E402
from proxy.evaluate import masked_psnr, sample  # noqa: E402
from proxy.model import PROXY_CONFIG, load_proxy  # noqa: E402

import hetcache_compile as hc  # noqa: E402

SETTINGS = {
    "hetcache quality": {"preset": "quality"},
    "hetcache balanced": {"preset": "balanced"},
    "hetcache fast": {"preset": "fast"},
    "hetcache balanced, partial=False": {"preset": "balanced", "partial": False},
    "fixed FF(RF)... (reuse half)": {"schedule": "FF" + "RF" * 9},
}


def run_setting(model, options: dict, clips, steps: int, shift: float, inner: str) -> tuple[list, dict, list]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="hetcache", options={"inner_backend": inner, **options})
    outputs, fractions = [], []
    for x0, mask in clips:
        outputs.append(sample(compiled, x0, mask, steps, shift, torch.Generator().manual_seed(0))[0])
    stats = hc.stats(model)
    fractions = [f for b in stats.branches.values() for f in b.token_fractions]
    return outputs, dict(stats.steps), fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--inner-backend", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_proxy()
    x0s, masks, _kinds = make_batch(heldout_seeds(args.clips))
    clips = [(x0s[i:i + 1], masks[i:i + 1]) for i in range(args.clips)]
    with torch.no_grad():
        reference = [sample(model, x0, mask, args.steps, args.shift, torch.Generator().manual_seed(0))[0]
                     for x0, mask in tqdm(clips, desc="full compute")]
        results = {}
        for name, options in tqdm(SETTINGS.items(), desc="settings"):
            results[name] = run_setting(model, options, clips, args.steps, args.shift, args.inner_backend)

    grid_tokens = (FRAMES // 1) * (HEIGHT // 2) * (WIDTH // 2)
    sizes = sorted({round(f * grid_tokens) for _, _, fr in results.values() for f in fr}) or [grid_tokens]
    config = {k: v for k, v in PROXY_CONFIG.items()}
    counted = variant_flops(config, 4 * (FRAMES - 1) + 1, HEIGHT * 8, WIDTH * 8, sizes, text_len=4)
    full_run = args.clips * args.steps * counted.full

    def psnr_vs(outputs, targets):
        return statistics.mean(s for o, t, (_, m) in zip(outputs, targets, clips) for s in masked_psnr(o, t, m))

    truth = [x0 for x0, _ in clips]
    rows = [["full compute", "inf", f"{psnr_vs(reference, truth):.2f}", "1.00x",
             f"{args.clips * args.steps}/0/0", "-"]]
    for name, (outputs, steps, fractions) in results.items():
        partial_flops = sum(counted.partial.get(round(f * grid_tokens), counted.full) for f in fractions)
        total = steps["full"] * counted.full + partial_flops + steps["reuse"] * counted.reuse
        rows.append([name, f"{psnr_vs(outputs, reference):.2f}", f"{psnr_vs(outputs, truth):.2f}",
                     f"{full_run / total:.2f}x", f"{steps['full']}/{steps['partial']}/{steps['reuse']}",
                     f"{100 * statistics.mean(fractions):.0f}%" if fractions else "-"])
    columns = ["method", "in-mask PSNR vs full compute (dB)", "in-mask PSNR vs ground truth (dB)",
               "FLOPs reduction", "calls F/P/R (all clips)", "mean |S|/N"]
    header = [f"machine: {machine_description()}", f"date: {utc_now()}; command: `{command_line()}`; "
              f"{time.time() - start:.0f} s",
              f"proxy model `benchmarks/proxy/weights` ({grid_tokens} tokens per clip), {args.clips} held-out clips, "
              f"Euler {args.steps} steps (shift {args.shift}), no CFG; inner backend {args.inner_backend}",
              "peers (FirstBlockCache, PAB, TaylorSeer, MagCache, DBCache) not measured yet"]
    write_table("quality", "Quality on the trained proxy: hetcache presets vs full compute", columns, rows,
                header=header)


if __name__ == "__main__":
    main()
