"""Context parallelism: what one rank computes and keeps, Wan2.1-VACE-14B at 720x1280, 81 frames, P = 1, 2, 4, 8.

Each P runs in this one process against a fake process group of P ranks (``torch.distributed``'s
``fake`` backend: collectives change nothing, shapes are right). The transformer is built on the meta
device from the published config (no weights), given diffusers' context parallelism (Ulysses, the plan
of ``hetcache_compile.cp_plan``), traced by Dynamo and rewritten by the hetcache passes exactly as on a
real rank; each variant runs on meta tensors under ``FlopCounterMode``. The figures are rank 0's; every
rank computes as many tokens (``hetcache_compile.sharding``), so they are every rank's.

Two edits: a centred box of 25% of every frame (spread over every shard), and the same box in the first
20 of 81 frames only (for P >= 4 it lies in one shard: the other ranks then recompute more context to
match the busiest, rather than wait). Caches are per CFG branch and rank, in bf16: the context keys and
values of this rank's heads (Ulysses: every rank's context tokens; Ring: all heads of its own context tokens),
and the branch's exit and residual rows of its shard.

    python benchmarks/parallel.py [--worlds 1 2 4 8] [--small]   # --small: a 2-block model, seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hetcache_compile as hc  # noqa: E402
import hetcache_compile.passes as passes  # noqa: E402
from common import command_line, dynamo_graphs, machine_description, markdown_table, utc_now, write_table  # noqa: E402
from flops import box_mask, count, step_kinds  # noqa: E402
from flops_families import WAN_VACE_14B  # noqa: E402

from hetcache_compile.config import HetCacheConfig  # noqa: E402
from hetcache_compile.families import family_of  # noqa: E402
from hetcache_compile.priors import classify_tokens, mask_to_token_grid  # noqa: E402
from hetcache_compile.selection import budget_size  # noqa: E402
from hetcache_compile.sharding import shard_size  # noqa: E402

logger = logging.getLogger("benchmarks.parallel")

FRAMES, HEIGHT, WIDTH = 81, 720, 1280
SMALL = {**WAN_VACE_14B, "num_layers": 2, "vace_layers": [0]}
BF16 = 2


def edits() -> dict[str, torch.Tensor]:
    everywhere = box_mask(FRAMES, HEIGHT, WIDTH)
    early = everywhere.clone()
    early[20:] = 0
    return {"box 25%, every frame": everywhere, "box 25%, frames 0-19": early}


def trace_rank(config: dict, world: int, scheme: str = "ulysses"):
    """Rank 0's Dynamo graph of the model sharded over ``world`` ranks (unsharded for 1), by ``scheme``."""
    from diffusers import ContextParallelConfig, WanVACETransformer3DModel

    with torch.device("meta"):
        model = WanVACETransformer3DModel(**config).eval()
        latents = torch.empty(1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
        inputs = dict(hidden_states=latents, timestep=torch.empty(1), encoder_hidden_states=torch.empty(1, 512, 4096),
                      control_hidden_states=torch.empty(1, 96, *latents.shape[2:]))
    if world > 1:
        if scheme == "ring":
            model.set_attention_backend("_native_flash")  # Ring needs the log-sum-exp
        degrees = {"ring_degree": world} if scheme == "ring" else {"ulysses_degree": world}
        model.enable_parallelism(config=ContextParallelConfig(**degrees), cp_plan=hc.cp_plan(model))
    graphs = dynamo_graphs(model, inputs)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one graph per rank, Dynamo made {len(graphs)}")
    return graphs[0]


def rows_for(config: dict, world: int, steps: int, scheme: str = "ulysses") -> list[list[str]]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world > 1:
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        gm, example_inputs = trace_rank(config, world, scheme)
        analysis = passes.analyze(gm, example_inputs, family_of(gm).hints)
        variants = passes.build_variants(gm, analysis, example_inputs)
        if variants.partial is None:
            raise RuntimeError(f"no partial variant at P={world}: {variants.partial_refused}")
        recorded = passes.StepOutputs.of_record(variants.record(*example_inputs), num_outputs=1)
        full = count(lambda: variants.full(*example_inputs))
        reuse = count(lambda: variants.reuse(*example_inputs, recorded.residual))
        probe = count(lambda: variants.probe(*example_inputs))
        kinds = step_kinds(HetCacheConfig(), steps)
        logger.info("P=%d: full %.3g, reuse %.3g, probe %.3g FLOPs a rank", world, full, reuse, probe)
        label = f"{scheme.capitalize()} x{world}" if world > 1 else "1 GPU"
        return [_row(label, name, mask, analysis, variants, example_inputs, recorded, full, reuse, probe, kinds)
                for name, mask in edits().items()]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _row(label, name, mask, analysis, variants, example_inputs, recorded, full, reuse, probe, kinds) -> list[str]:
    config = HetCacheConfig()
    world = analysis.shards.world if analysis.shards else 1
    ring = analysis.shards is not None and analysis.shards.scheme == "ring"
    grid, patch = analysis.token_grid.grid, analysis.token_grid.patch
    classes = classify_tokens(mask_to_token_grid(mask, grid, patch)[0], config.margin_radius)
    shard = analysis.region.num_tokens
    size = (shard_size(classes, world, config.context_ratio, config.margin_ratio, config.size_buckets) if world > 1
            else budget_size(classes, config.context_ratio, config.margin_ratio, config.size_buckets))
    context = shard - size if ring else classes.num_tokens - world * size  # Ring: this rank's own context rows
    caches = [c.narrow(-2, 0, context) for c in recorded.caches]
    extra = passes.partial_arguments(torch.arange(size, device="meta"), recorded.exit, None, caches)
    partial = count(lambda: variants.partial(*example_inputs, *extra))
    cache_bytes = sum(c.numel() for c in [*caches, recorded.exit, recorded.residual]) * BF16
    per_kind = {"F": full, "P": partial, "R": reuse}
    run = sum(per_kind[k] + probe for k in kinds)
    baseline = len(kinds) * (full + probe)
    return [label, name, f"{shard}", f"{size} ({100 * size / shard:.0f}%)", f"{full / 1e12:.0f}",
            f"{partial / 1e12:.0f}", f"{partial / full:.2f}", f"{cache_bytes / 1e9:.1f}",
            f"{2 * baseline / 1e15:.1f} -> {2 * run / 1e15:.1f}", f"{baseline / run:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--schemes", nargs="+", default=["ulysses", "ring"], choices=("ulysses", "ring"))
    parser.add_argument("--small", action="store_true", help="2 blocks instead of 40 (a quick check; not written)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.accelerator.device_count = lambda: 1  # one process plays rank 0 of each world: no devices needed
    start = time.time()
    config = SMALL if args.small else WAN_VACE_14B
    runs = [(world, scheme) for world in args.worlds for scheme in (args.schemes if world > 1 else ["ulysses"])]
    rows = [row for world, scheme in tqdm(runs, desc="ranks") for row in rows_for(config, world, args.steps, scheme)]
    columns = ["ranks", "edit", "tokens a rank", "partial step: tokens a rank (|S|/P)", "full step TFLOPs a rank",
               "partial step TFLOPs a rank", "partial/full", "caches a branch and rank (GB, bf16)",
               "PFLOPs a rank, one CFG video (full -> hetcache)", "FLOPs reduction"]
    header = [
        f"machine: {machine_description()} (FLOPs and bytes do not depend on it)",
        f"date: {utc_now()}; command: `{command_line()}`; {time.time() - start:.0f} s",
        "Wan2.1-VACE-14B (published config, meta device), 720x1280, 81 frames (75,600 tokens), Ulysses or Ring over "
        "P ranks (one process playing rank 0 of a fake process group; Ring with diffusers' `_native_flash` "
        "attention); default preset; two CFG branches",
        f"step mix of one branch over {args.steps} steps (the Wan proxy of `flops.py`): "
        f"`{step_kinds(HetCacheConfig(), args.steps)}`",
        "weights are not sharded by context parallelism: 34.7 GB (bf16, 17.3 B parameters) on every rank",
    ]
    if args.small:
        print(markdown_table(columns, rows))
        return
    write_table("parallel", "Context parallelism: per-rank FLOPs and caches, Wan2.1-VACE-14B 720p x 81", columns, rows,
                header=header)


if __name__ == "__main__":
    main()
