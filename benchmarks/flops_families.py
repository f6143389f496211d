"""FLOPs of the default preset on each model family hetcache rewrites, at that family's published size.

Each transformer is built on the ``meta`` device from its published config (no weights), traced by
Dynamo and rewritten by the hetcache passes with the family's hints; each variant runs on meta
tensors under ``FlopCounterMode``. The edit is a centred box of 25% of every frame. One CFG run is
the default preset's step mix over 50 steps (the adaptive schedule driven by the Wan proxy of
``flops.py``: a randomly initialised time embedder) with two branches, the selection included.
The same step mix for every family isolates what the partial and reuse steps cost on each
architecture; the trained models' own schedules would differ.

    python benchmarks/flops_families.py
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hetcache_compile.passes as passes  # noqa: E402
from common import command_line, dynamo_graphs, machine_description, utc_now, write_table  # noqa: E402
from flops import (  # noqa: E402
    WAN_VACE_1_3B,
    VariantFlops,
    box_mask,
    count,
    run_flops,
    selection_cost,
    step_kinds,
)

from hetcache_compile.budget import choose_cache_plan  # noqa: E402
from hetcache_compile.config import HetCacheConfig  # noqa: E402
from hetcache_compile.families import family_of  # noqa: E402
from hetcache_compile.passes.graph_utils import output_node  # noqa: E402
from hetcache_compile.priors import classify_tokens, mask_to_token_grid  # noqa: E402
from hetcache_compile.selection import budget_size  # noqa: E402

logger = logging.getLogger("benchmarks.flops_families")

COGVIDEOX_5B = dict(  # THUDM/CogVideoX-5b transformer/config.json
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
    attention_bias=True, flip_sin_to_cos=True, freq_shift=0,
)

HUNYUAN_VIDEO = dict(  # hunyuanvideo-community/HunyuanVideo transformer/config.json
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)

LTX_VIDEO = dict(  # Lightricks/LTX-Video transformer/config.json (0.9.x)
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
    cross_attention_dim=2048, num_layers=28, qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
    norm_eps=1e-6, caption_channels=4096, attention_bias=True, attention_out_bias=True,
)

WAN_VACE_14B = dict(  # Wan-AI/Wan2.1-VACE-14B-diffusers transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, vace_layers=list(range(0, 40, 5)), vace_in_channels=96,
)

QWEN_IMAGE = dict(  # Qwen/Qwen-Image transformer/config.json
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)

SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)

FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


@dataclass(frozen=True)
class FamilyCase:
    """A model at its published size: how to build it and its inputs on the meta device."""

    model: str
    size: str  # pixels and frames, as the pipeline's defaults
    cfg: str  # how its pipeline runs classifier-free guidance
    mask_source: str
    frames: int
    height: int
    width: int
    build: Callable[[], tuple[torch.nn.Module, dict]]
    heads: int
    head_dim: int
    branches: int = 2  # transformer samples per step: 2 with CFG (sequential or batched), 1 guidance-distilled
    packed_grid: tuple[int, int, int] | None = None  # tokens of packed latents (the graph has no grid)
    packed_patch: tuple[int, int, int] = (1, 1, 1)  # latent cells a packed token holds


def _wan_vace(config: dict = WAN_VACE_1_3B) -> tuple[torch.nn.Module, dict]:
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**config)
    shape = (1, 16, 21, 60, 104)  # 81 frames of 480 x 832
    return model, dict(hidden_states=torch.empty(shape), timestep=torch.empty(1),
                       encoder_hidden_states=torch.empty(1, 512, 4096),
                       control_hidden_states=torch.empty(1, 96, *shape[2:]))


def _cogvideox_5b() -> tuple[torch.nn.Module, dict]:
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**COGVIDEOX_5B)
    frames, height, width = 13, 60, 90  # 49 frames of 480 x 720
    tokens = frames * (height // 2) * (width // 2)
    rope = (torch.empty(tokens, 64), torch.empty(tokens, 64))
    return model, dict(hidden_states=torch.empty(1, frames, 16, height, width), timestep=torch.empty(1),
                       encoder_hidden_states=torch.empty(1, 226, 4096), image_rotary_emb=rope)


def _hunyuan_video() -> tuple[torch.nn.Module, dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(**HUNYUAN_VIDEO)
    shape = (1, 16, 33, 68, 120)  # 129 frames of 544 x 960
    return model, dict(hidden_states=torch.empty(shape), timestep=torch.empty(1),
                       encoder_hidden_states=torch.empty(1, 256, 4096), encoder_attention_mask=torch.empty(1, 256),
                       pooled_projections=torch.empty(1, 768), guidance=torch.empty(1))


def _ltx_video() -> tuple[torch.nn.Module, dict]:
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(**LTX_VIDEO)
    frames, height, width = 21, 16, 22  # 161 frames of 512 x 704, packed one latent cell a token
    return model, dict(hidden_states=torch.empty(1, frames * height * width, 128), timestep=torch.empty(1),
                       encoder_hidden_states=torch.empty(1, 128, 4096), encoder_attention_mask=torch.empty(1, 128),
                       num_frames=frames, height=height, width=width)


def _flux_dev(fill: bool = False) -> tuple[torch.nn.Module, dict]:
    """FLUX.1-dev, or FLUX.1-Fill-dev: latents, masked-image latents and 256 mask channels (384 in all)."""
    from diffusers import FluxTransformer2DModel

    channels = 384 if fill else 64
    model = FluxTransformer2DModel(**{**FLUX_DEV, "in_channels": channels, "out_channels": 64})
    tokens = 64 * 64  # 1024 x 1024: 128 x 128 latent cells, packed 2 x 2 a token
    return model, dict(hidden_states=torch.empty(1, tokens, channels), encoder_hidden_states=torch.empty(1, 512, 4096),
                       pooled_projections=torch.empty(1, 768), timestep=torch.empty(1), guidance=torch.empty(1),
                       img_ids=torch.empty(tokens, 3), txt_ids=torch.empty(512, 3))


def _qwen_image() -> tuple[torch.nn.Module, dict]:
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**QWEN_IMAGE)
    side = 83  # 1328 x 1328: 166 x 166 latent cells, packed 2 x 2 a token
    # no padding mask: on the meta device its prompt length cannot be computed (FLOPs are the same)
    return model, dict(hidden_states=torch.empty(1, side * side, 64), encoder_hidden_states=torch.empty(1, 256, 3584),
                       timestep=torch.empty(1), img_shapes=[(1, side, side)])


def _sd3_medium() -> tuple[torch.nn.Module, dict]:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**SD3_MEDIUM)
    return model, dict(hidden_states=torch.empty(1, 16, 128, 128), encoder_hidden_states=torch.empty(1, 333, 4096),
                       pooled_projections=torch.empty(1, 2048), timestep=torch.empty(1))


CASES = [
    FamilyCase("Wan2.1-VACE-1.3B", "480x832, 81 frames", "sequential (cond, uncond)", "control_hidden_states",
               81, 480, 832, _wan_vace, 12, 128),
    FamilyCase("Wan2.1-VACE-14B", "480x832, 81 frames", "sequential (cond, uncond)", "control_hidden_states",
               81, 480, 832, lambda: _wan_vace(WAN_VACE_14B), 40, 128),
    FamilyCase("CogVideoX-5B", "480x720, 49 frames", "batched (one branch of 2)", "set_mask",
               49, 480, 720, _cogvideox_5b, 48, 64),
    FamilyCase("HunyuanVideo", "544x960, 129 frames", "guidance-distilled (one branch); true CFG sequential",
               "set_mask", 129, 544, 960, _hunyuan_video, 24, 128, branches=1),
    FamilyCase("LTX-Video 0.9", "512x704, 161 frames", "batched (one branch of 2)", "set_mask (token grid or pixels)",
               161, 512, 704, _ltx_video, 32, 64, packed_grid=(21, 16, 22)),
    FamilyCase("FLUX.1-dev", "1024x1024 image", "guidance-distilled (one branch)", "set_mask (token grid or pixels)",
               1, 1024, 1024, _flux_dev, 24, 128, branches=1, packed_grid=(1, 64, 64), packed_patch=(1, 2, 2)),
    FamilyCase("FLUX.1-Fill-dev", "1024x1024 image", "guidance-distilled (one branch)", "hidden_states (mask channels)",
               1, 1024, 1024, lambda: _flux_dev(fill=True), 24, 128, branches=1, packed_grid=(1, 64, 64),
               packed_patch=(1, 2, 2)),
    FamilyCase("Qwen-Image", "1328x1328 image", "sequential (true CFG)", "set_mask (token grid or pixels)",
               1, 1328, 1328, _qwen_image, 24, 128, packed_grid=(1, 83, 83), packed_patch=(1, 2, 2)),
    FamilyCase("SD3-medium", "1024x1024 image", "batched (one branch of 2)", "-", 1, 1024, 1024, _sd3_medium, 24, 64),
]


def trace(case: FamilyCase):
    """Dynamo's graph and example inputs of ``case``'s transformer on the meta device."""
    with torch.device("meta"):
        model, inputs = case.build()
    return max(dynamo_graphs(model.eval(), inputs), key=lambda item: len(item[0].graph.nodes))


def row_for(case: FamilyCase, steps: int) -> list[str]:
    gm, example_inputs = trace(case)
    analysis = passes.analyze(gm, example_inputs, family_of(gm).hints)
    config = HetCacheConfig()
    variants = default_plan_variants(gm, analysis, example_inputs, config)
    kinds = step_kinds(config, steps)
    if variants.partial is None:  # partial steps run as full steps
        outputs = []
        full = count(lambda: outputs.extend(variants.full(*example_inputs)))
        probe = _probe_flops(variants, example_inputs)
        reuse = count(lambda: variants.reuse(*example_inputs, passes.StepOutputs.of_full(outputs, 1).residual))
        baseline = steps * (full + probe)
        total = sum(reuse if kind == "R" else full for kind in kinds) + steps * probe
        return [case.model, case.size, case.cfg, case.mask_source, "no (full and reuse steps)",
                family_of(gm).why(variants.partial_refused), f"{case.branches * baseline / 1e15:.1f} -> "
                f"{case.branches * total / 1e15:.1f}", f"{baseline / total:.2f}x"]
    grid, patch = analysis.token_grid.grid, analysis.token_grid.patch
    if analysis.token_grid.packed:
        grid, patch = case.packed_grid, case.packed_patch
    num_tokens = analysis.region.num_tokens
    factors = family_of(gm).pixel_factors
    token_mask = mask_to_token_grid(box_mask(case.frames, case.height, case.width), grid, patch, factors)[0]
    classes = classify_tokens(token_mask, config.margin_radius)
    size = budget_size(classes, config.context_ratio, config.margin_ratio, config.size_buckets)

    recorded = passes.StepOutputs.of_record(variants.record(*example_inputs), num_outputs=1)
    full = count(lambda: variants.full(*example_inputs))
    index = torch.arange(size, device="meta")
    context = [c.narrow(-2, size, c.shape[-2] - size) for c in recorded.caches]
    rows = torch.arange(size, num_tokens, device="meta")
    extra = passes.partial_arguments(index, recorded.exit, rows, context, recompute=variants.recompute)
    partial = count(lambda: variants.partial(*example_inputs, *extra))
    reuse = count(lambda: variants.reuse(*example_inputs, recorded.residual))
    probe = _probe_flops(variants, example_inputs)
    flops = VariantFlops(full=full, reuse=reuse, probe=probe, partial={size: partial}, num_tokens=num_tokens, grid=grid)
    heads = dict(num_attention_heads=case.heads, attention_head_dim=case.head_dim)
    selection = selection_cost(num_tokens, classes.generative.numel(), classes.context.numel(), heads)
    baseline = case.branches * steps * (full + probe)
    total = run_flops(flops, kinds, size, selection) * case.branches // 2
    return [case.model, case.size, case.cfg, case.mask_source,
            "yes, keys/values " + ("recomputed" if variants.recompute else "stored"),
            f"{num_tokens} tokens, grid {list(grid)}; |S|/N {100 * size / num_tokens:.0f}%; partial/full "
            f"{partial / full:.2f}", f"{baseline / 1e15:.1f} -> {total / 1e15:.1f}", f"{baseline / total:.2f}x"]


def default_plan_variants(gm, analysis, example_inputs, config: HetCacheConfig) -> passes.Variants:
    """The variants under the cache plan the backend picks by default (no budget): keys and values
    recomputed where the graph allows it, else stored."""
    def build(cache_dtype, recompute):
        return passes.build_variants(gm, analysis, example_inputs, recompute=recompute)

    num_outputs = len(output_node(gm.graph).args[0])
    return choose_cache_plan(build, example_inputs, num_outputs, config, limit=None)[0]


def _probe_flops(variants, example_inputs) -> int:
    return count(lambda: variants.probe(*example_inputs)) if variants.probe is not None else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    rows = [row_for(case, args.steps) for case in tqdm(CASES, desc="families")]
    kinds = step_kinds(HetCacheConfig(), args.steps)
    columns = ["model", "size", "CFG in its pipeline", "edit mask from", "partial steps", "tokens and partial step",
               "PFLOPs per video (full -> balanced)", "FLOPs reduction"]
    header = [
        f"machine: {machine_description()} (FLOPs do not depend on it)",
        f"date: {utc_now()}; command: `{command_line()}`; {time.time() - start:.0f} s",
        "counted with FlopCounterMode on the meta device from each published config (no weights); edit: a centred "
        "box of 25% of every frame; default preset (balanced)",
        f"step mix of one branch over {args.steps} steps, the same for every family (the Wan proxy of "
        f"`flops.py`): `{kinds}`; two branches (CFG) or one (guidance-distilled) per step",
    ]
    write_table("flops_families", "FLOPs by model family: the default preset at each family's published size",
                columns, rows, header=header)


if __name__ == "__main__":
    main()
