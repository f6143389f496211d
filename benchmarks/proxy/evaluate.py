"""Evaluate the trained proxy on held-out inpainting clips against trivial fills, by PSNR inside the mask.

The proxy samples with a plain Euler flow-matching loop (``--steps`` steps over Wan's shifted
sigmas, from pure noise, with the VACE control of the clip); "1 step" is its single prediction at
``t = 1``, ``x0_hat = noise - v``, which estimates the posterior mean (the MSE-optimal fill, so it
is expected to score a higher PSNR than a sample, which also has to invent detail). The trivial
fills use the same known latents:

- zero fill: the dataset mean (latents are normalised to zero mean);
- mean fill: each channel's mean over the clip's known cells;
- diffusion fill: a Gaussian-blurred inpaint: start from the mean fill, then repeat a 3x3x3
  space-time Gaussian blur of the whole clip and reset the known cells, ``--fill-iters`` times
  (the harmonic interpolation of the surroundings, in space and time);
- per-frame diffusion fill: the same with a 1x3x3 blur, so after the mean-fill start nothing passes
  between frames.

PSNR per clip, over the hidden cells of all channels, ``10 log10(R^2 / MSE)`` with ``R`` the
clip's range ``max(x0) - min(x0)`` (torchmetrics' ``peak_signal_noise_ratio`` with that
``data_range``), averaged over clips; SSIM inside the mask as ``benchmarks/quality.py`` computes it
(``quality_metrics.clip_scores``). Needs the ``[bench]`` extra (torchmetrics). Writes
``benchmarks/results/proxy.md``.

    python benchmarks/proxy/evaluate.py                # 300 held-out clips, 20 Euler steps
    python benchmarks/proxy/evaluate.py --proxy scenes --clips 200   # the second proxy (specs.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

from common import REPO_ROOT, command_line, machine_description, utc_now, write_table  # noqa: E402
from quality_metrics import clip_scores  # noqa: E402

from proxy.model import WEIGHTS_NAME, load_proxy, prompt_embeds, sha256, shift_sigma, vace_control  # noqa: E402
from proxy.specs import PROXIES, get_proxy  # noqa: E402


def masked_psnr(pred: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, inside: bool = True) -> list[float]:
    """Per-clip PSNR over the hidden (``inside``) or known cells of ``[B, 16, F, H, W]`` latents (torchmetrics)."""
    scores = []
    for p, x, m in zip(pred, x0, mask):
        sel = (m > 0.5) if inside else (m <= 0.5)
        sel = sel.unsqueeze(0).expand_as(x)
        scores.append(float(peak_signal_noise_ratio(p[sel], x[sel], data_range=float(x.max() - x.min()))))
    return scores


def masked_ssim(pred: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per-clip SSIM averaged over the hidden cells, as ``benchmarks/quality.py`` computes it."""
    return clip_scores(list(pred[:, None]), list(x0[:, None]), list(x0[:, None]), list(mask[:, None])).ssim_mask


def mean_fill(x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    known = 1 - mask.unsqueeze(1)
    mean = (x0 * known).sum(dim=(2, 3, 4), keepdim=True) / known.sum(dim=(2, 3, 4), keepdim=True)
    return x0 * known + mean * (1 - known)


def diffusion_fill(x0: torch.Tensor, mask: torch.Tensor, iters: int, across_frames: bool = True) -> torch.Tensor:
    known = 1 - mask.unsqueeze(1)
    taps = torch.tensor([0.25, 0.5, 0.25])
    time_taps = taps if across_frames else torch.tensor([0.0, 1.0, 0.0])
    kernel = (time_taps[:, None, None] * taps[None, :, None] * taps[None, None, :])
    channels = x0.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3, 3).contiguous()
    x = mean_fill(x0, mask)
    for _ in range(iters):
        x = F.conv3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), kernel, groups=channels)
        x = x0 * known + x * (1 - known)
    return x


@torch.no_grad()
def sample(model, x0: torch.Tensor, mask: torch.Tensor, steps: int, shift: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler flow-matching sample and the one-step estimate at ``t = 1``, from the same noise."""
    control = vace_control(x0, mask)
    text = prompt_embeds(x0.shape[0])
    noise = torch.randn(x0.shape, generator=generator)

    def velocity(x, sigma):
        timestep = torch.full((x.shape[0],), float(sigma) * 1000)
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                     control_hidden_states=control, return_dict=False)[0]

    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)
    x = noise
    one_step = None
    for i in range(steps):
        v = velocity(x, sigmas[i])
        if i == 0:
            one_step = noise - v
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, one_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--proxy", default="tiles", choices=sorted(PROXIES), help="which proxy (benchmarks/proxy/specs.py)")
    p.add_argument("--weights", type=Path, default=None, help="weights directory (default: the proxy's)")
    p.add_argument("--clips", type=int, default=300, help="held-out clips (taken in turn from the mask kinds)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--shift", type=float, default=3.0, help="sigma shift of the sampling schedule")
    p.add_argument("--fill-iters", type=int, default=100, help="blur-and-reset rounds of the diffusion fill")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results file name under benchmarks/results/ (default: proxy, proxy_<name>)")
    args = p.parse_args(argv)
    proxy = get_proxy(args.proxy)
    data = proxy.data
    heldout_seeds, make_batch, mask_kinds = data.heldout_seeds, data.make_batch, data.MASK_KINDS
    args.weights = args.weights or proxy.weights_dir
    args.out = args.out or ("proxy" if proxy.name == "tiles" else f"proxy_{proxy.name}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model = load_proxy(args.weights)
    generator = torch.Generator().manual_seed(args.seed)
    methods = [f"proxy, Euler {args.steps} steps", "proxy, 1 step (x0 estimate at t=1)",
               "zero fill (dataset mean)", "mean fill (known cells' channel means)",
               f"diffusion fill (space-time Gaussian blur, {args.fill_iters} rounds)",
               f"per-frame diffusion fill (spatial Gaussian blur, {args.fill_iters} rounds)"]
    inside = {m: [] for m in methods}
    ssim = {m: [] for m in methods}
    outside = {m: [] for m in methods[:2]}
    kinds: list[str] = []
    seeds = list(heldout_seeds(args.clips))
    for first in tqdm(range(0, len(seeds), args.batch), desc="held-out batches"):
        x0, mask, batch_kinds = make_batch(seeds[first:first + args.batch])
        kinds += batch_kinds
        euler, one_step = sample(model, x0, mask, args.steps, args.shift, generator)
        preds = [euler, one_step, torch.zeros_like(x0), mean_fill(x0, mask), diffusion_fill(x0, mask, args.fill_iters),
                 diffusion_fill(x0, mask, args.fill_iters, across_frames=False)]
        for method, pred in zip(methods, preds):
            inside[method] += masked_psnr(pred, x0, mask)
            ssim[method] += masked_ssim(pred, x0, mask)
        for method, pred in zip(methods[:2], preds[:2]):
            outside[method] += masked_psnr(pred, x0, mask, inside=False)
    elapsed = time.perf_counter() - start

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.2f}"

    fills = methods[2:]

    def share_above(method: str, baselines: list[str]) -> str:
        """Share of clips on which ``method`` beats every one of ``baselines``."""
        wins = sum(s > max(bs) for s, *bs in zip(inside[method], *(inside[b] for b in baselines)))
        return f"{100 * wins / len(kinds):.0f}%"

    rows = []
    for method in methods:
        scores = inside[method]
        row = [method] + [mean([s for s, k in zip(scores, kinds) if k == kind]) for kind in mask_kinds]
        row += [mean(scores), f"{sum(ssim[method]) / len(ssim[method]):.3f}",
                "-" if method == methods[3] else share_above(method, [methods[3]]),
                "-" if method in fills else share_above(method, fills)]
        row.append(mean(outside[method]) if method in outside else "exact")
        rows.append(row)
    columns = ["method", *(f"PSNR {k} (dB)" for k in mask_kinds), "PSNR all (dB)", "in-mask SSIM, all",
               "clips above mean fill", "clips above every fill", "PSNR known cells (dB)"]
    weights_file = args.weights / WEIGHTS_NAME
    try:
        weights_name = weights_file.resolve().relative_to(REPO_ROOT)
    except ValueError:
        weights_name = weights_file
    header = [
        f"{utc_now()}; {machine_description()}",
        f"command: `{command_line()}` ({elapsed:.0f} s)",
        f"weights: `{weights_name}`, SHA-256 `{sha256(weights_file)}`",
        f"{len(seeds)} held-out clips (seeds {seeds[0]}..{seeds[-1]}), {len(seeds) // len(mask_kinds)} per mask kind, "
        f"proxy `{proxy.name}`, latents {' x '.join(map(str, proxy.latent_shape))} ({proxy.num_tokens} tokens)",
        "PSNR over the hidden cells of each clip, peak = the clip's latent range, mean over clips; higher is better",
    ]
    def kind_means(method: str) -> list[float]:
        scores = inside[method]
        return [sum(s for s, k in zip(scores, kinds) if k == kind) / kinds.count(kind) for kind in mask_kinds] + [
            sum(scores) / len(scores)]

    best = [max(values) for values in zip(*(kind_means(f) for f in fills))]
    margins = []
    for method in methods[:2]:
        diffs = [p - b for p, b in zip(kind_means(method), best)]
        margins.append(f"{method}: " + ", ".join(f"{kind} {d:+.2f}" for kind, d in zip([*mask_kinds, "all"], diffs)))
    notes = [
        "Proxy minus the best trivial fill of each column (dB; positive = the proxy is better): "
        + "; ".join(margins) + ".",
        "",
        "The proxy (a 4-layer `WanVACETransformer3DModel`, `benchmarks/proxy/README.md`) sees the known latents "
        "through VACE's control input and generates the whole clip from noise. \"1 step\" is the MSE-optimal "
        "kind of estimate (a posterior mean), so it scores above a sample, which draws one plausible fill. "
        "\"PSNR known cells\" is how closely the proxy reproduces the context it was given.",
    ]
    write_table(args.out, f"Proxy model `{proxy.name}`: held-out latent inpainting quality", columns, rows, header=header, notes=notes)


if __name__ == "__main__":
    main()
