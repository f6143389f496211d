"""The outputs of ``benchmarks/quality.py``: the markdown table, the JSON of every number, the Pareto plot.

``write(scored, latency, run)`` takes ``(Result, scores vs full compute, scores vs ground truth)``
per method (scores None when the method failed), the Inductor latency rows and the run's facts.
"""

from __future__ import annotations

import json
import math
import statistics
import time

from common import (
    RESULTS_DIR,
    command_line,
    machine_description,
    markdown_table,
    source_description,
    utc_now,
    write_table,
)
from quality_metrics import SSIM_KERNEL, SSIM_SIGMA, mean

TARGET_DB, TARGET_REDUCTION = 30.0, 3.0
LEAD_DB, LEAD_AT = 2.0, (4.0, 5.0)  # issue 12: >= 2 dB over step skipping at equal FLOPs, at 4x and 5x


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _status(result, full_flops: int) -> str:
    """ok; failed; or wrong output for FirstBlockCache / MagCache once they skipped anything (reference.md)."""
    if result.error:
        return "failed"
    if result.method.family in ("FirstBlockCache", "MagCache") and result.flops < full_flops:
        return "wrong output (known defect)"
    return "ok"


def _calls(result) -> str:
    if not result.method.hetcache or result.error:
        return ""
    s = result.steps
    frac = f", mean |S|/N {100 * statistics.mean(result.fractions):.0f}%" if result.fractions else ""
    compiled = f", partial variant compiled {result.compiles.get('partial', 0)}x" if result.fractions else ""
    return f"calls F/P/R {s['full']}/{s['partial']}/{s['reuse']}{frac}{compiled}"


def summarise(scored: list, full_flops: int) -> list[dict]:
    """One dict per method: names, status, the eight scores, FLOPs reduction, seconds per clip."""
    rows = []
    for result, vs_full, vs_truth in scored:
        m = result.method
        row = dict(
            family=m.family,
            options=m.options,
            hetcache_options=m.options_dict,
            status=_status(result, full_flops),
            error=result.error,
            note="; ".join(x for x in (m.note, _calls(result)) if x),
        )
        if vs_full is not None:
            for tag, sc in (("full", vs_full), ("truth", vs_truth)):
                row |= {
                    f"psnr_mask_{tag}": mean(sc.psnr_mask),
                    f"ssim_mask_{tag}": mean(sc.ssim_mask),
                    f"psnr_all_{tag}": mean(sc.psnr_all),
                    f"ssim_all_{tag}": mean(sc.ssim_all),
                }
            row["flops"] = result.flops
            row["reduction"] = full_flops / result.flops
            row["seconds"] = statistics.median(result.seconds) if result.seconds else math.nan
            row["mode"] = "aot_eager" if m.hetcache else "eager"
        rows.append(row)
    return rows


def _table_row(row: dict) -> list[str]:
    if row["error"]:
        return [row["family"], row["options"], f"failed: {row['error']}"] + ["-"] * 10 + [row["note"]]
    scores = [
        _db(row[f"psnr_{w}_{t}"]) if k == "psnr" else f"{row[f'ssim_{w}_{t}']:.4f}"
        for t in ("full", "truth")
        for w in ("mask", "all")
        for k in ("psnr", "ssim")
    ]
    return [
        row["family"],
        row["options"],
        row["status"],
        *scores,
        f"{row['reduction']:.2f}x",
        f"{row['seconds']:.3f} ({row['mode']})",
        row["note"],
    ]


def _dominating(r: dict, others: list[dict]) -> str:
    """The settings among ``others`` at equal or fewer FLOPs with equal or better in-mask PSNR than ``r``."""
    found = [o for o in others if o["reduction"] >= r["reduction"] and o["psnr_mask_full"] >= r["psnr_mask_full"]]
    if not found:
        return "none at equal or fewer FLOPs reaches equal or better in-mask PSNR"
    return "dominated by " + ", ".join(
        f"{o['family']} `{o['options']}` ({o['reduction']:.2f}x, {_db(o['psnr_mask_full'])} dB)" for o in found
    )


def skipping_psnr_at(reduction: float, skipping: list[dict]) -> float | None:
    """Step skipping's in-mask PSNR at ``reduction``, linear between the two step counts around it (None outside)."""
    points = sorted((r["reduction"], r["psnr_mask_full"]) for r in skipping)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= reduction <= x1:
            return y0 + (y1 - y0) * (reduction - x0) / (x1 - x0)
    return None


def lead_over_skipping(rows: list[dict]) -> list[str]:
    """Each hetcache setting's in-mask PSNR minus step skipping's at the same FLOPs; the best lead at 4x and 5x."""
    ok = [r for r in rows if "psnr_mask_full" in r]
    skipping = [r for r in ok if r["family"] == "step skipping"]
    leads = []
    for r in ok:
        base = skipping_psnr_at(r["reduction"], skipping) if r["family"] == "hetcache" else None
        if base is not None:
            r["lead_over_skipping_db"] = r["psnr_mask_full"] - base
            leads.append(r)
    lines = []
    for at in LEAD_AT:
        # a setting counts at ``at`` when it saves at least that much: its lead is measured at its own FLOPs
        near = [r for r in leads if r["reduction"] >= at]
        best = max(near, key=lambda r: r["lead_over_skipping_db"], default=None)
        if best is None:
            lines.append(f"Lead over step skipping at >= {at:.0f}x: no hetcache setting measured there.")
            continue
        met = "met" if best["lead_over_skipping_db"] >= LEAD_DB else "not met"
        lines.append(
            f"Lead over step skipping at >= {at:.0f}x (target {LEAD_DB:+.0f} dB, {met}): best `{best['options']}` "
            f"({best['reduction']:.2f}x, {best['psnr_mask_full']:.2f} dB, {best['lead_over_skipping_db']:+.2f} dB "
            f"over step skipping interpolated to {best['reduction']:.2f}x)."
        )
    presets = [r for r in leads if set(r["hetcache_options"]) == {"preset"}]
    if presets:
        lines.append("Presets against step skipping at their own FLOPs: " + "; ".join(
            f"{r['options']} {r['reduction']:.2f}x {r['lead_over_skipping_db']:+.2f} dB" for r in presets) + ".")
    return lines


def verdict(rows: list[dict]) -> list[str]:
    """The issue's target: hetcache at >= 3x fewer FLOPs keeps >= 30 dB; no peer dominates it."""
    ok = [r for r in rows if "psnr_mask_full" in r]
    hetcache = [r for r in ok if r["family"] == "hetcache"]
    meeting = [r for r in hetcache if r["reduction"] >= TARGET_REDUCTION and r["psnr_mask_full"] >= TARGET_DB]
    lines = [
        f"Target (a), hetcache at >= {TARGET_REDUCTION:.0f}x fewer FLOPs with in-mask PSNR vs full compute "
        f">= {TARGET_DB:.0f} dB: "
        + (
            "met by "
            + "; ".join(f"`{r['options']}` ({r['reduction']:.2f}x, {r['psnr_mask_full']:.2f} dB)" for r in meeting)
            if meeting
            else "not met by any hetcache setting measured."
        )
    ]
    caches = [r for r in ok if r["family"] not in ("hetcache", "full compute", "step skipping")]
    skipping = [r for r in ok if r["family"] == "step skipping"]
    best_cache = max(caches, key=lambda o: o["reduction"], default=None)
    if best_cache is not None:
        lines.append(
            f"The caching peers reach at most {best_cache['reduction']:.2f}x fewer FLOPs here "
            f"({best_cache['family']} `{best_cache['options']}`)."
        )
    for r in hetcache:
        label = "Target (b) for hetcache" if r in meeting else "Below the target, hetcache"
        lines.append(
            f"{label} `{r['options']}` ({r['reduction']:.2f}x, {_db(r['psnr_mask_full'])} dB): "
            f"caching peers: {_dominating(r, caches)}; step skipping: {_dominating(r, skipping)}."
        )
    return lines + lead_over_skipping(rows)


def plot(rows: list[dict], path, steps: int, proxy: str) -> None:
    """Pareto plot: in-mask PSNR vs full compute (y) against FLOPs reduction (x), one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>xP*"
    fig, ax = plt.subplots(figsize=(9, 6))
    families = list(dict.fromkeys(r["family"] for r in rows if "reduction" in r and r["family"] != "full compute"))
    top = 60.0
    for i, family in enumerate(families):
        pts = sorted(
            (
                (r["reduction"], min(r["psnr_mask_full"], top))
                for r in rows
                if r["family"] == family and "reduction" in r
            ),
            reverse=True,
        )
        frontier = [p for k, p in enumerate(pts) if all(q[1] < p[1] for q in pts[:k])]  # Pareto-optimal points
        (line,) = ax.plot(*zip(*frontier), linestyle="-", linewidth=1, alpha=0.6)
        ax.plot(*zip(*pts), marker=markers[i % len(markers)], linestyle="", color=line.get_color(), label=family)
    ax.axhline(TARGET_DB, color="grey", linestyle=":", linewidth=1)
    ax.axvline(TARGET_REDUCTION, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("FLOPs reduction vs full compute (x)")
    ax.set_ylabel(f"in-mask PSNR vs full-compute output (dB; identical outputs drawn at {top:.0f})")
    ax.set_title(f"Quality vs FLOPs, proxy {proxy!r}, {steps} Euler steps (lines: Pareto fronts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(scored: list, latency: list, run: dict) -> None:
    full_flops = run["full_counted"]
    rows = summarise(scored, full_flops)
    columns = [
        "method",
        "options",
        "status",
        "in-mask PSNR vs full (dB)",
        "in-mask SSIM vs full",
        "frame PSNR vs full (dB)",
        "frame SSIM vs full",
        "in-mask PSNR vs GT (dB)",
        "in-mask SSIM vs GT",
        "frame PSNR vs GT (dB)",
        "frame SSIM vs GT",
        "FLOPs reduction",
        "s/clip (mode)",
        "note",
    ]
    header = [
        f"machine: {machine_description()}",
        f"date: {utc_now()}; command: `{command_line()}`; {run['seconds']:.0f} s; {source_description()}",
        f"proxy `{run['proxy']}` (`{run['weights']}`, {run['num_tokens']} tokens a clip), {run['clips']} held-out clips "
        f"(seeds from 1e9), Euler {run['steps']} steps (shift {run['shift']}), no CFG, same noise for every method; "
        f"hetcache quality runs use inner backend `{run['inner']}`, peers run eagerly (uncompiled) as their docs do",
    ]
    notes = [
        f"Metrics (torchmetrics): mean over clips of per-clip PSNR / SSIM on the {run['latent_shape'][0]}-channel "
        f"latents {run['latent_shape']} (no VAE); in-mask = the hidden cells, frame = all cells; "
        "data range = the ground-truth "
        f"clip's max - min for every comparison; SSIM per latent frame (Gaussian window "
        f"{SSIM_KERNEL}x{SSIM_KERNEL}, sigma {SSIM_SIGMA:g}), "
        "its full map averaged over the hidden cells or all cells. 'inf': identical to full compute.",
        f"FLOPs: FlopCounterMode's count (matmuls, convolutions, attention; elementwise ops not counted) with a "
        f"formula registered for the CPU SDPA op. Peers and step skipping: counted on their real runs. hetcache: "
        f"FlopCounterMode cannot see inside compiled code, so its runs are priced from the calls it made "
        f"(full / partial at each |S| / reuse, from `hc.stats`) with meta-device counts of each variant, plus "
        f"the probe on every call and an upper bound of token selection (relevance + k-means over all tokens) on "
        f"every full call. Check: full compute counted on the real run {full_flops / 1e9:.3f} GFLOP, from the "
        f"meta-device count {run['full_meta'] / 1e9:.3f} GFLOP for the same runs "
        f"({'agree exactly' if run['full_meta'] == full_flops else 'DIFFER'}).",
        "s/clip: median seconds per clip at the benchmark's thread count, timed without the FLOP counter; the "
        f"proxy is tiny ({run['num_tokens']} tokens), so these are dominated by Python and hook overhead, not by FLOPs. hetcache's "
        "column is its aot_eager quality run, which includes recompiling the partial variant for each new |S| "
        "(counts in the note), so it is not representative of speed"
        + ("; steady-state Inductor timings are below." if latency else " (`--inductor PRESET...` times it)."),
        "Peer notes: FirstBlockCache and MagCache hook `blocks` only and reuse a residual that already holds the "
        "VACE hints, which the model adds again: wrong outputs, kept as results. PAB's CFG defect does not "
        "apply (no CFG). TaylorSeer with its default identifiers hooks nothing on Wan (row says so); the other "
        "TaylorSeer rows hook attention and FFN of the blocks and VACE blocks. MagCache needs per-model "
        f"mag_ratios: from its calibration mode on training clip 0 (seed 0, disjoint from the held-out "
        f"clips): {', '.join(f'{r:.3f}' for r in run['ratios'])}. No peer skips the VACE branch except when "
        "a hook predicts it (TaylorSeer). Under torch.compile several peers recompile (reference.md), so "
        "they are timed eagerly only.",
        *verdict(rows),
    ]
    if latency:
        notes += [
            "",
            "CPU latency with Inductor: the first run of held-out clip 0 compiles (its seconds depend on Inductor's "
            "on-disk cache) and is not timed; then the same clip is sampled again (a new run each time, so hetcache's "
            "partial variant, compiled per |S|, is not recompiled inside the timing); median of those runs:",
            "",
            markdown_table(
                ["method", "options", "s/clip (median)", "first clip incl. compile (s)", "runs timed"], latency
            ),
        ]
    name = run["name"]
    write_table(
        name,
        f"Quality vs FLOPs on the trained proxy `{run['proxy']}`: hetcache, diffusers / cache-dit caches, step skipping",
        columns,
        [_table_row(r) for r in rows],
        header=header,
        notes=notes,
    )
    (RESULTS_DIR / f"{name}.json").write_text(
        json.dumps(
            dict(run=run, rows=rows, latency=latency, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
            indent=1,
            default=str,
        )
    )
    plot(rows, RESULTS_DIR / f"{name}.png", run["steps"], run["proxy"])
