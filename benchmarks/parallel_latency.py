"""Context parallelism, measured: a masked WanVACE edit over P processes, plain torch.compile vs hetcache.

    torchrun --nproc-per-node 2 benchmarks/parallel_latency.py            # CPU (gloo); GPUs (nccl) unchanged

Each rank runs the whole ``WanVACEPipeline`` call with random-weight components (``tests/models.py``,
a transformer of dim 256 and 6 blocks; 21 x 16 x 16 latent cells: 1,344 tokens, 672 a rank for 2 ranks)
under diffusers' Ulysses context parallelism with the plan of ``hetcache_compile.cp_plan``. Each
configuration gets a freshly built transformer (a deep copy would keep calling the original's forward
through diffusers' hooks) and a first, untimed run that compiles; then ``--repeats`` timed runs, the
median reported. The inner compiler of both is ``--compiler`` (aot_eager by default: Inductor's CPU
compile of every variant on every rank takes minutes). Rank 0 writes the table, with each rank's steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hetcache_compile as hc  # noqa: E402
from common import command_line, machine_description, utc_now, write_table  # noqa: E402
from models import edit_inputs, tiny_vace_pipeline, tiny_vace_transformer  # noqa: E402
from parallel_edit import start_processes  # noqa: E402  (gloo on the CPU, nccl and one GPU a rank otherwise)

MODEL = dict(num_layers=6, vace_layers=(0, 3), heads=4, head_dim=64, text_dim=64, ffn_dim=1024)
INPUTS = dict(frames=81, height=128, width=128, text_dim=64)


def timed(device: torch.device, steps: int, repeats: int, **compile_kwargs) -> tuple[list[float], torch.nn.Module,
                                                                                     torch.Tensor]:
    from diffusers import ContextParallelConfig

    torch._dynamo.reset()
    transformer = tiny_vace_transformer(**MODEL).to(device)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()),
                                   cp_plan=hc.cp_plan(transformer))
    pipe = tiny_vace_pipeline(torch.compile(transformer, **compile_kwargs)).to(device)
    pipe.set_progress_bar_config(disable=True)
    inputs = edit_inputs(**INPUTS)
    seconds = []
    for _ in range(repeats + 1):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        video = pipe(**inputs, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        hc.finish_compiling(transformer)  # Inductor compiles hetcache's pieces in the background
    return seconds[1:], transformer, video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiler", default="aot_eager", choices=("inductor", "aot_eager"))
    args = parser.parse_args()
    device = start_processes()
    rank, world = dist.get_rank(), dist.get_world_size()
    plain, _, reference = timed(device, args.steps, args.repeats, backend=args.compiler)
    fast, model, video = timed(device, args.steps, args.repeats, backend="hetcache",
                               options={"inner_backend": args.compiler})
    stats = hc.stats(model)
    steps = {name: "".join(kind[0].upper() for kind in branch.history) for name, branch in stats.branches.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, f"rank {rank}: {stats.summary()}; {steps}")
    if rank == 0:
        baseline, ours = statistics.median(plain), statistics.median(fast)
        rows = [[f"Ulysses x{world}", device.type, f"{baseline:.2f}", f"{ours:.2f}", f"{baseline / ours:.2f}x",
                 f"{(video - reference).abs().max().item():.2e}"]]
        header = [f"machine: {machine_description()}", f"date: {utc_now()}; command: `{command_line()}`",
                  f"WanVACEPipeline, random weights, transformer {MODEL}, {INPUTS['frames']} frames of "
                  f"{INPUTS['height']}x{INPUTS['width']}, {args.steps} steps, CFG; inner compiler {args.compiler}; "
                  f"median of {args.repeats} after a compiling run"]
        write_table("parallel_latency", "Context parallelism: hetcache vs plain compiled Ulysses, wall clock",
                    ["parallelism", "device", "plain compile (s)", "hetcache (s)", "speedup",
                     "max abs difference of the video"], rows, header=header, notes=gathered)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
