"""Real-scale FLOPs of HetCache on Wan2.1-VACE-1.3B, counted without weights.

The transformer is built on the ``meta`` device from its published config, traced by Dynamo,
rewritten by the hetcache passes, and each variant (full, partial at the preset's |S|, reuse,
probe) runs on meta tensors under ``FlopCounterMode`` (SDPA decomposes to matmuls there and is
counted). A whole 50-step CFG run is then the sum over its transformer calls, with the step
kinds the adaptive schedule picks from the real timestep schedule of the pipeline.

The modulation signal that drives the adaptive schedule comes from a *randomly initialised*
time embedder of the real config (no weights can be downloaded here): the schedule is a proxy,
and the table shows it so every ratio can be recomputed.

    python benchmarks/flops.py                 # 33 and 81 frames, box and moving masks
    python benchmarks/flops.py --frames 33     # one setting
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hetcache_compile.passes as passes  # noqa: E402
from common import command_line, dynamo_graphs, machine_description, utc_now, write_table  # noqa: E402

from hetcache_compile.budget import candidate_plans  # noqa: E402
from hetcache_compile.config import PRESETS, HetCacheConfig  # noqa: E402
from hetcache_compile.priors import classify_tokens, mask_to_token_grid  # noqa: E402
from hetcache_compile.schedule import make_scheduler  # noqa: E402
from hetcache_compile.selection import budget_size  # noqa: E402

logger = logging.getLogger("benchmarks.flops")

WAN_VACE_1_3B = dict(  # Wan-AI/Wan2.1-VACE-1.3B-diffusers transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, vace_layers=list(range(0, 30, 2)), vace_in_channels=96,
)
HEIGHT, WIDTH, TEXT_LEN, STEPS, FLOW_SHIFT = 480, 832, 512, 50, 3.0


@dataclass
class VariantFlops:
    """FLOPs of one transformer call of each kind (partial: per |S|)."""

    full: int
    reuse: int
    probe: int
    partial: dict[int, int]
    num_tokens: int
    grid: tuple[int, int, int]


def count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def trace_meta_model(config: dict, frames: int, height: int, width: int, text_len: int = TEXT_LEN):
    """Dynamo graph and example inputs of the transformer on the meta device (no weights)."""
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        model = WanVACETransformer3DModel(**config).eval()
    latent_frames = (frames - 1) // 4 + 1
    shape = (1, config["in_channels"], latent_frames, height // 8, width // 8)
    inputs = dict(
        hidden_states=torch.empty(shape, device="meta"),
        timestep=torch.empty(1, device="meta"),
        encoder_hidden_states=torch.empty(1, text_len, config["text_dim"], device="meta"),
        control_hidden_states=torch.empty(1, config["vace_in_channels"], *shape[2:], device="meta"),
    )
    return dynamo_graphs(model, inputs)[0]


def variant_flops(config: dict, frames: int, height: int, width: int, selected: list[int],
                  text_len: int = TEXT_LEN, recompute: bool = False) -> VariantFlops:
    """FLOPs of one call of each variant for ``config`` at a pixel size (partial: per |S| in ``selected``;
    ``recompute``: with the context's keys and values recomputed, ``recompute_kv=True``)."""
    gm, example_inputs = trace_meta_model(config, frames, height, width, text_len)
    analysis = passes.analyze(gm, example_inputs)
    variants = passes.build_variants(gm, analysis, example_inputs, recompute=recompute)
    if variants.partial is None:
        raise RuntimeError(f"no partial variant: {variants.partial_refused}")
    full = count(lambda: variants.full(*example_inputs))
    recorded = passes.StepOutputs.of_record(variants.record(*example_inputs), num_outputs=1)
    reuse = count(lambda: variants.reuse(*example_inputs, recorded.residual))
    probe = count(lambda: variants.probe(*example_inputs))
    partial = {}
    for size in sorted(set(selected)):
        index = torch.arange(size, device="meta")
        context = [c.narrow(-2, size, c.shape[-2] - size) for c in recorded.caches]  # any N - |S| rows
        rows = torch.arange(size, recorded.exit.shape[1], device="meta")
        extra = passes.partial_arguments(index, recorded.exit, rows, context, recompute=recompute)
        partial[size] = count(lambda: variants.partial(*example_inputs, *extra))
    return VariantFlops(full=full, reuse=reuse, probe=probe, partial=partial, num_tokens=analysis.region.num_tokens,
                        grid=analysis.token_grid.grid)


# -- masks -----------------------------------------------------------------------------------
def box_mask(frames: int, height: int, width: int, area: float = 0.25) -> torch.Tensor:
    """A centred box covering ``area`` of every frame (pixel mask video ``[F, H, W]``)."""
    mask = torch.zeros(frames, height, width)
    side = math.sqrt(area)
    h, w = round(height * side), round(width * side)
    top, left = (height - h) // 2, (width - w) // 2
    mask[:, top:top + h, left:left + w] = 1.0
    return mask


def moving_mask(frames: int, height: int, width: int, area: float = 0.12) -> torch.Tensor:
    """An object box of ``area`` sliding from the left edge to the right edge over the clip."""
    mask = torch.zeros(frames, height, width)
    side = math.sqrt(area)
    h, w = round(height * side), round(width * side)
    top = (height - h) // 2
    for f in range(frames):
        left = round((width - w) * f / max(frames - 1, 1))
        mask[f, top:top + h, left:left + w] = 1.0
    return mask


MASKS = {"box 25%": box_mask, "moving object": moving_mask}


# -- schedules -------------------------------------------------------------------------------
@functools.cache
def modulation_signals(steps: int) -> list[torch.Tensor]:
    """``timestep_proj`` of a randomly initialised Wan2.1-1.3B time embedder at each step's timestep."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding

    torch.manual_seed(0)
    embedder = WanTimeTextImageEmbedding(dim=1536, time_freq_dim=256, time_proj_dim=1536 * 6, text_embed_dim=16,
                                         image_embed_dim=None).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    scheduler.set_timesteps(steps)
    text = torch.zeros(1, 1, 16)
    with torch.no_grad():
        return [embedder(t.reshape(1), text)[1] for t in scheduler.timesteps]


def step_kinds(config: HetCacheConfig, steps: int) -> str:
    """The letters one CFG branch gets over a run (F full, P partial, R reuse)."""
    scheduler = make_scheduler(config)
    kinds = [scheduler.next_kind(signal) for signal in modulation_signals(steps)]
    return "".join(kind.value[0].upper() for kind in kinds)


# -- the table -------------------------------------------------------------------------------
def run_flops(flops: VariantFlops, kinds: str, selected: int, selection_flops: int) -> float:
    """Total FLOPs of one CFG run (two branches with the same kinds)."""
    per_kind = {"F": flops.full + selection_flops, "P": flops.partial.get(selected, flops.full), "R": flops.reuse}
    return 2 * sum(per_kind[k] + flops.probe for k in kinds)


def selection_cost(num_tokens: int, generative: int, context: int, config: dict, clusters: int = 16) -> int:
    """Relevance (q_G k^T and softmax) plus 10 k-means iterations, counted analytically."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    relevance = 2 * heads * generative * num_tokens * head_dim + 5 * heads * generative * num_tokens
    kmeans = 10 * 3 * context * clusters * heads * head_dim
    return relevance + kmeans


def recomputes_on_wan(config: HetCacheConfig) -> bool:
    """Whether ``config``'s partial steps recompute the context's keys and values on Wan, whose keys are a
    projection of the tokens, so the first plan the backend tries is the one it builds (``prune="block"``)."""
    _cache_dtype, recompute = candidate_plans(config)[0]
    return recompute and config.prune == "block"


def rows_for(frames: int, mask_name: str, steps: int) -> list[list[str]]:
    height, width = HEIGHT, WIDTH
    latent_frames = (frames - 1) // 4 + 1
    grid = (latent_frames, height // 16, width // 16)
    pixels = MASKS[mask_name](frames, height, width)
    token_mask = mask_to_token_grid(pixels, grid, (1, 2, 2))[0]
    configs = {"full compute": HetCacheConfig(schedule="full")}
    configs |= {f"hetcache {name}": HetCacheConfig.from_options({"preset": name}) for name in PRESETS}
    configs["reuse only (balanced, no partial)"] = HetCacheConfig.from_options({"partial": False})
    configs["hetcache balanced, recompute_kv=False"] = HetCacheConfig.from_options({"recompute_kv": False})
    sizes = {}
    for name, config in configs.items():
        classes = classify_tokens(token_mask, config.margin_radius)
        sizes[name] = (budget_size(classes, config.context_ratio, config.margin_ratio, config.size_buckets),
                       classes)
    flops = variant_flops(WAN_VACE_1_3B, frames, height, width, [size for size, _ in sizes.values()])
    recomputed = variant_flops(WAN_VACE_1_3B, frames, height, width,
                               [size for name, (size, _) in sizes.items() if recomputes_on_wan(configs[name])],
                               recompute=True)
    baseline = None
    rows = []
    for name, config in configs.items():
        size, classes = sizes[name]
        flops_of = recomputed if recomputes_on_wan(config) else flops
        kinds = step_kinds(config, steps)
        if not config.partial:
            kinds = kinds.replace("P", "F")
        selection = selection_cost(flops.num_tokens, classes.generative.numel(), classes.context.numel(),
                                   WAN_VACE_1_3B) if "P" in kinds else 0
        total = run_flops(flops_of, kinds, size, selection)
        baseline = baseline or total
        counts = {k: kinds.count(k) for k in "FPR"}
        rows.append([
            f"{frames}", mask_name, name, f"{counts['F']}/{counts['P']}/{counts['R']}",
            f"{100 * size / flops.num_tokens:.0f}%" if counts["P"] else "-",
            f"{total / 1e15:.1f}", f"{baseline / total:.2f}x", f"`{kinds}`",
        ])
    return rows, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    rows, notes = [], []
    settings = [(f, m) for f in args.frames for m in MASKS]
    for frames, mask_name in tqdm(settings, desc="settings"):
        new_rows, flops = rows_for(frames, mask_name, args.steps)
        rows += new_rows
        note = (f"{frames} frames: {flops.num_tokens} tokens (grid {list(flops.grid)}); one call: full "
                f"{flops.full / 1e12:.1f} TFLOP, reuse {flops.reuse / 1e12:.3f} TFLOP, probe "
                f"{flops.probe / 1e9:.3f} GFLOP")
        if note not in notes:
            notes.append(note)
    columns = ["frames", "mask", "method", "steps F/P/R per branch", "|S|/N", "PFLOPs per video", "vs full",
               "schedule (one branch)"]
    header = [
        f"machine: {machine_description()} (FLOPs do not depend on it)",
        f"date: {utc_now()}; command: `{command_line()}`; {time.time() - start:.0f} s",
        "counted with FlopCounterMode on the meta device (no weights); the adaptive schedule is driven by a "
        "randomly initialised time embedder of the real config, so the step mix is a proxy for the trained model",
        *notes,
        "cache plans: the default recomputes the context's keys and values (two projections, with their norm and "
        "RoPE, of the context rows at every site of every partial step); `recompute_kv=False` stores them (its "
        "row); `cache_dtype` (bfloat16, float8) and "
        "`cache_device='cpu'` leave the counted FLOPs as they are: casts, scales and copies are elementwise "
        "or transfers, which FlopCounterMode does not count",
    ]
    write_table("flops", "FLOPs: Wan2.1-VACE-1.3B, 480x832, 50 steps, CFG on (2 calls per step)", columns, rows,
                header=header)


if __name__ == "__main__":
    main()
