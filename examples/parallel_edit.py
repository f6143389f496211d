"""A masked WanVACE edit under context parallelism (Ulysses), plain torch.compile vs ``backend="hetcache"``.

    torchrun --nproc-per-node 2 examples/parallel_edit.py                 # CPU processes over gloo
    torchrun --nproc-per-node 2 examples/parallel_edit.py --compiler aot_eager   # quicker to compile

Unchanged on GPUs (nccl, one per rank). The transformer gets diffusers' context parallelism with the
plan ``hetcache_compile.cp_plan`` provides for WanVACE (diffusers has none), then is compiled twice:
plain, and with hetcache. Each pipeline runs twice (the first compiles, the second is timed); each rank
prints the steps hetcache ran, rank 0 the speedup and the largest difference from plain compile.

Each rank's graph is rewritten: the ranks take the same full, partial and reuse steps (checked with one
small all-reduce a call), each computes as many of its own tokens in a partial step, and each keeps its
heads' share of the caches. Random-weight components (``tests/models.py``); a model this small times
mostly Python overhead: ``benchmarks/parallel_latency.py`` measures a larger one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from models import edit_inputs, tiny_vace_pipeline, tiny_vace_transformer  # noqa: E402

import hetcache_compile as hc  # noqa: E402

MODEL = dict(num_layers=4, vace_layers=(0, 2), heads=4, head_dim=32, text_dim=64, ffn_dim=256)
INPUTS = dict(frames=9, height=64, width=64, text_dim=64)  # 3 x 4 x 4 tokens: 24 a rank with 2 ranks


def start_processes() -> torch.device:
    """Join the process group torchrun describes; one GPU per rank when there are GPUs, else gloo on the CPU."""
    if torch.cuda.is_available():
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    torch.accelerator.device_count = lambda: 1  # CPU: diffusers places rank r on device r % device_count
    dist.init_process_group("gloo")
    return torch.device("cpu")


def parallel_transformer(device: torch.device) -> torch.nn.Module:
    from diffusers import ContextParallelConfig

    transformer = tiny_vace_transformer(**MODEL).to(device)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()),
                                   cp_plan=hc.cp_plan(transformer))
    return transformer


def timed_edit(transformer: torch.nn.Module, inputs: dict, steps: int, device: torch.device, **compile_kwargs):
    """Two edits with ``transformer`` compiled by ``compile_kwargs``; returns the model, the second video and
    its seconds."""
    torch._dynamo.reset()
    model = torch.compile(transformer, **compile_kwargs)
    pipe = tiny_vace_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        video = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames[0]
        seconds = time.perf_counter() - start
        hc.finish_compiling(model)  # hetcache compiles in the background: the timed run is the compiled one
    return model, video, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"),
                        help="plain compile's backend, and hetcache's inner backend")
    args = parser.parse_args()
    device = start_processes()
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = edit_inputs(**INPUTS)
    # one transformer each (the same seeded weights): a deep copy would keep calling the original's
    # forward through the context-parallel hooks diffusers installs
    _, reference, baseline = timed_edit(parallel_transformer(device), inputs, args.steps, device,
                                        backend=args.compiler)
    model, video, seconds = timed_edit(parallel_transformer(device), inputs, args.steps, device, backend="hetcache",
                                       options={"inner_backend": args.compiler})
    stats = hc.stats(model)
    histories = {name: "".join(kind[0].upper() for kind in branch.history) for name, branch in stats.branches.items()}
    print(f"rank {rank}/{world}: {stats.summary()}; graphs {stats.graphs}, rewritten "
          f"{stats.graphs - len(stats.fallback_reasons)}; steps {histories or 'all full (compiled unchanged)'}",
          flush=True)
    dist.barrier()
    if rank == 0:
        print(f"context parallelism, Ulysses x{world} on {device.type}: plain {args.compiler} {baseline:.2f} s, "
              f"hetcache {seconds:.2f} s: {baseline / seconds:.2f}x; max abs difference of the video "
              f"{(video - reference).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
