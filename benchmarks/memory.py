"""Cache memory at real scale, before anything is loaded: Wan2.1-VACE 1.3B and 14B, 480p and 720p, 33 and 81 frames.

For each model and video size, ``hetcache_compile.memory.cache_memory`` traces the transformer on
the ``meta`` device (bfloat16, the published configs, no weights), builds the variants under each
cache plan and prices what one CFG branch holds at its peak (every token's keys and values right
after a full step records them, the relevance query and key, the residual and its slope). The
table gives the weights, the caches of two CFG branches (diffusers' sequential CFG) per plan,
and the GPU sizes where weights plus caches fit. Activations of the step being computed are not
counted (they are plain torch.compile's, measured by ``latency.py`` on a GPU).

    python benchmarks/memory.py                       # the whole table (a few minutes on 2 CPU cores)
    python benchmarks/memory.py --models 1.3B --frames 33 --sizes 480x832
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_description, utc_now, write_table  # noqa: E402
from flops import WAN_VACE_1_3B  # noqa: E402

from hetcache_compile.budget import candidate_plans  # noqa: E402
from hetcache_compile.config import HetCacheConfig  # noqa: E402
from hetcache_compile.memory import cache_memory  # noqa: E402
from hetcache_compile.passes.graph_utils import tensor_bytes  # noqa: E402

WAN_VACE_14B = dict(  # Wan-AI/Wan2.1-VACE-14B-diffusers transformer/config.json
    WAN_VACE_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40, vace_layers=list(range(0, 40, 5)),
)
MODELS = {"1.3B": WAN_VACE_1_3B, "14B": WAN_VACE_14B}
DEFAULT_PLAN = candidate_plans(HetCacheConfig())[0]  # what the backend builds first with default options
GPU_SIZES_GB = (24, 48, 80, 141)
TEXT_LEN = 512
BRANCHES = 2
GIB = 2 ** 30


def meta_model(config: dict) -> torch.nn.Module:
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        return WanVACETransformer3DModel(**config).to(torch.bfloat16).eval()


def meta_inputs(config: dict, frames: int, height: int, width: int) -> dict:
    latent = (1, config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    empty = lambda *shape: torch.empty(shape, device="meta", dtype=torch.bfloat16)  # noqa: E731
    return dict(hidden_states=empty(*latent), timestep=torch.empty(1, device="meta"),
                encoder_hidden_states=empty(1, TEXT_LEN, config["text_dim"]),
                control_hidden_states=empty(1, config["vace_in_channels"], *latent[2:]), return_dict=False)


def fits(total_bytes: int) -> str:
    sizes = [f"{gb}" for gb in GPU_SIZES_GB if total_bytes <= gb * 1e9]
    return ", ".join(sizes) if sizes else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["480x832", "720x1280"], help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    parser.add_argument("--name", default="memory", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    settings = [(m, s, f) for m in args.models for s in args.sizes for f in args.frames]
    rows, plan_names = [], []
    weights = {}
    for name, size, frames in tqdm(settings, desc="memory", unit="setting"):
        config = MODELS[name]
        model = meta_model(config)
        weights[name] = tensor_bytes(model.parameters())
        height, width = (int(v) for v in size.split("x"))
        plans = cache_memory(model, meta_inputs(config, frames, height, width))
        default = next((p for p in plans if (p.cache_dtype, p.recompute_kv) == DEFAULT_PLAN), plans[0])
        plan_names = plan_names or [p.plan + (" = default" if p is default else "") for p in plans]
        row = [name, f"{size} x {frames}", f"{plans[0].num_tokens:,}", plans[0].cached_sites,
               f"{weights[name] / GIB:.1f}"]
        for plan in plans:
            caches = BRANCHES * plan.bytes_per_branch
            row += [f"{caches / GIB:.1f}", fits(weights[name] + caches)]
        # the default plan in host memory: what stays on the device, what goes to the host
        on_device = BRANCHES * default.offloaded_bytes_per_branch
        row += [f"{on_device / GIB:.1f}", f"{BRANCHES * default.key_value_bytes / GIB:.1f}",
                fits(weights[name] + on_device)]
        rows.append(row)
        torch._dynamo.reset()

    columns = ["model", "video (px x frames)", "tokens", "cached sites", "weights (GiB)"]
    for plan in plan_names:
        columns += [f"caches, {plan} (GiB)", f"fits (GB) {plan}"]
    columns += ["caches on the GPU, default plan in host memory (GiB)", "host memory (GiB)",
                "fits (GB), in host memory"]
    write_table(
        args.name, "hetcache cache memory at real scale (two CFG branches, bfloat16 model)", columns, rows,
        header=[f"when: {utc_now()}", f"machine: {machine_description()} (nothing runs: meta tensors)",
                f"command: `{command_line()}`"],
        notes=["Caches: what two CFG branches hold at their peak (one branch's peak: every token's keys and values "
               "of every self-attention site right after a full step, the relevance query and key, the residual "
               "and its slope). 'fits': GPU sizes (GB) where bfloat16 weights plus these caches fit; the "
               "activations of the step being computed come on top (plain torch.compile's own peak).",
               "Plans (what `max_cache_bytes` chooses among): as computed (bfloat16 keys and values, "
               "`recompute_kv=False`); recomputed (the default: the keys' and values' projection input, one tensor "
               "for two: exact, costs two projections of the context rows a site); `cache_dtype='float8_e4m3fn'` "
               "(one byte a value and a float32 scale per token and head), stored or recomputed. `'bfloat16'` is no "
               "plan here: the model computes in bfloat16.",
               "In host memory (`cache_device='cpu'`, exact; the default plan): every site's caches go to pinned "
               "host "
               "memory right after its attention; a partial step brings each back one attention ahead on a "
               "side stream, so the GPU holds two sites' caches at a time, beside the residual, the final "
               "hidden states and the relevance query and key. The host holds the rest (per-plan host bytes are "
               "the plan's caches without those)."],
    )


if __name__ == "__main__":
    main()
