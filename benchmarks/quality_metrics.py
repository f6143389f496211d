"""Metrics and FLOPs for ``benchmarks/quality.py``.

Quality: torchmetrics' PSNR and SSIM on latents ``[B, C, F, H, W]``, per clip, inside the mask
(hidden cells) and over the whole clip. ``data_range`` is the ground-truth clip's range
``max(x0) - min(x0)`` for every comparison (against the full-compute output too), so the two
reference columns share one scale. SSIM treats each latent frame as a C-channel image
(Gaussian window 5x5, sigma 1.0: the latent frames are only 12x12 cells) and averages
torchmetrics' full SSIM map (``return_full_image=True``) over the hidden cells, or over all cells.

FLOPs: what ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls, convolutions,
attention; elementwise work is not counted), with a formula registered here for the CPU SDPA op
(``aten._scaled_dot_product_flash_attention_for_cpu``, same as the CUDA flash op's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

SSIM_KERNEL, SSIM_SIGMA = 5, 1.0
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

try:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        """Forward FLOPs of the CPU flash-attention op: ``q k^T`` and ``p v`` (as the CUDA flash op)."""
        return sdpa_flop_count(query, key, value)  # shapes: get_raw=False hands over shapes
except (RuntimeError, ValueError):  # already registered (module imported twice, or torch gained it)
    pass


@dataclass
class Scores:
    """Per-clip scores of one output against one reference."""

    psnr_mask: list[float]
    psnr_all: list[float]
    ssim_mask: list[float]
    ssim_all: list[float]


def _psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> float:
    if torch.equal(pred, target):
        return math.inf
    from torchmetrics.functional.image import peak_signal_noise_ratio  # the [bench] extra

    return float(peak_signal_noise_ratio(pred, target, data_range=data_range))


def clip_scores(
    preds: list[torch.Tensor], targets: list[torch.Tensor], truths: list[torch.Tensor], masks: list[torch.Tensor]
) -> Scores:
    """Scores of each ``preds[i]`` ``[1, 16, F, H, W]`` against ``targets[i]``; ranges from ``truths[i]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # the [bench] extra

    out = Scores([], [], [], [])
    for pred, target, truth, mask in zip(preds, targets, truths, masks):
        data_range = float(truth.max() - truth.min())
        hidden = (mask[0] > 0.5).unsqueeze(0).expand_as(pred[0])  # [16, F, H, W]
        out.psnr_mask.append(_psnr(pred[0][hidden], target[0][hidden], data_range))
        out.psnr_all.append(_psnr(pred, target, data_range))
        frames_p, frames_t = pred[0].permute(1, 0, 2, 3), target[0].permute(1, 0, 2, 3)  # [F, 16, H, W]
        _, ssim_map = structural_similarity_index_measure(
            frames_p,
            frames_t,
            data_range=data_range,
            kernel_size=SSIM_KERNEL,
            sigma=SSIM_SIGMA,
            return_full_image=True,
            reduction="none",
        )
        ssim_map = ssim_map.permute(1, 0, 2, 3)  # back to [16, F, H, W]
        out.ssim_mask.append(float(ssim_map[hidden].mean()))
        out.ssim_all.append(float(ssim_map.mean()))
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class FlopCount:
    """``with FlopCount() as c: ...`` then ``c.total``: FLOPs FlopCounterMode counted inside."""

    def __enter__(self) -> FlopCount:
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self.total = self._mode.get_total_flops()


def selection_flops(num_tokens: int, heads: int, head_dim: int, clusters: int = 16) -> int:
    """Upper bound of one hetcache token selection: relevance and 10 k-means rounds over all tokens."""
    relevance = 2 * heads * num_tokens * num_tokens * head_dim + 5 * heads * num_tokens * num_tokens
    return relevance + 10 * 3 * num_tokens * clusters * heads * head_dim


def hetcache_flops(steps: dict, fractions: list[float], counted, num_tokens: int, heads: int, head_dim: int) -> int:
    """FLOPs of hetcache runs priced from the meta-device counts of each variant.

    ``steps``: calls by kind (``hc.stats(model).steps``), ``fractions``: |S|/N of each partial
    call, ``counted``: ``flops.VariantFlops`` (``partial`` must hold every |S| used). Every call
    pays the probe; every full call pays an upper bound of the token selection that follows it
    (only when the run has partial calls).
    """
    calls = steps["full"] + steps["partial"] + steps["reuse"]
    partial = sum(counted.partial[round(f * num_tokens)] for f in fractions)
    selection = selection_flops(num_tokens, heads, head_dim) if steps["partial"] else 0
    full = steps["full"] * (counted.full + selection)
    return full + partial + steps["reuse"] * counted.reuse + calls * counted.probe
