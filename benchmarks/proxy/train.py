"""Train the proxy Wan-VACE transformer on procedural latent inpainting (``data.py``), on CPU.

Wan's rectified-flow objective: ``t ~ U(0, 1)`` shifted by ``--shift`` (as Wan's scheduler shifts
its sigmas), ``x_t = (1 - t) * x0 + t * noise``, the model sees ``x_t``, ``timestep = 1000 t``, the
VACE control (``model.vace_control``: the known latents, zeros, and 64 mask channels) and a fixed
text embedding, and predicts ``v = noise - x0``; the loss is the MSE on ``v``, weighted
``--mask-weight`` times more on the hidden cells. AdamW with a linear warm-up and a cosine decay.

``--proxy`` picks the data and the defaults (``specs.py``). With ``--crop-steps`` the first steps
train on random ``--crop-size`` crops of the clips (cheaper: attention is quadratic in the tokens),
the rest on whole clips. The clips come from a pool of ``--pool`` training seeds, generated once (a few ms a clip), each
drawn in a random flip of height, width and time (the data are symmetric under all three). Every
random draw comes from generators seeded by ``--seed``, and deterministic algorithms are on, so
the same command with the same ``--threads`` on the same torch build rebuilds the weights bit for
bit (a different thread count may change float reduction order, and so the last bits).

    python benchmarks/proxy/train.py --threads 2          # the committed weights (README.md), about 24 min
    python benchmarks/proxy/train.py --proxy scenes --threads 2   # the second proxy's weights, about an hour
    python benchmarks/proxy/train.py --steps 20 --out /tmp/proxy-a   # a quick check
    python benchmarks/proxy/train.py --device cuda --out /tmp/proxy-g  # screening on a GPU (not bit-exact)

Writes ``config.json`` and ``proxy.safetensors`` (``save_pretrained``, renamed), ``SHA256SUMS``
and ``train_log.json`` into ``--out``; with the default ``--out`` it also records the command,
checksum and wall time in ``benchmarks/proxy/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

from common import machine_description  # noqa: E402

from proxy.data import train_seeds  # noqa: E402
from proxy.model import (  # noqa: E402
    DIFFUSERS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    build_model,
    num_parameters,
    prompt_embeds,
    sha256,
    shift_sigma,
    vace_control,
)
from proxy.specs import PROXIES, get_proxy  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"


def markers(proxy: str) -> tuple[str, str]:
    """The README block ``train.py`` rewrites for ``proxy`` (the first proxy's markers predate the second)."""
    tag = "train.py" if proxy == "tiles" else f"train.py {proxy}"
    return f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"


def parse_args(argv=None) -> argparse.Namespace:
    # --proxy is read first: it sets the other options' defaults
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--proxy", default="tiles", choices=sorted(PROXIES), help="which proxy (benchmarks/proxy/specs.py)")
    proxy = get_proxy(pre.parse_known_args(argv)[0].proxy)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    p.add_argument("--shift", type=float, default=3.0, help="timestep shift of the training t (1 = uniform)")
    p.add_argument("--mask-weight", type=float, default=8.0, help="loss weight of hidden cells (known cells: 1)")
    p.add_argument("--pool", type=int, default=8192, help="training clips, seeds 0 .. pool-1")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation, the batches, t and the noise")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (part of what reproduces the bits)")
    p.add_argument("--device", default="cpu",
                   help="where the model trains; the data are drawn on the CPU either way. Off the CPU, "
                        "deterministic algorithms only warn, so a GPU run is for screening, not the committed bits")
    p.add_argument("--time-limit", type=float, default=45.0,
                   help="minutes; a guard against an overloaded machine: training past it stops with an "
                        "error and saves nothing (the committed command, at 2 threads, takes about 24 min)")
    p.add_argument("--workers", type=int, default=1, help="processes that draw the clip pool (same clips)")
    p.add_argument("--crop-steps", type=int, default=0, help="first steps on random crops of the clips")
    p.add_argument("--crop-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="crop size, in cells")
    p.add_argument("--crop-batch", type=int, default=None, help="batch of the crop steps (default --batch)")
    p.add_argument("--out", type=Path, default=proxy.weights_dir)
    p.set_defaults(**proxy.train_defaults)
    args = p.parse_args(argv)
    if args.crop_steps and args.crop_size is None:
        p.error("--crop-steps needs --crop-size")
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_pool(make_batch, count: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of training seeds ``0 .. count-1`` (``x0``, ``mask``); each clip depends on its seed alone,
    so ``workers`` processes give the same tensors as one."""
    seeds = train_seeds(0, count)
    if workers <= 1:
        x0, mask, _ = make_batch(tqdm(seeds, desc="clips", leave=False))
        return x0, mask
    chunks = [seeds[i:i + 256] for i in range(0, count, 256)]
    # one thread a worker: forked workers inherit the parent's thread count, and several threads
    # a worker on small tensors made drawing the clips 4x slower
    with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        parts = pool.map(make_batch, chunks)
    return torch.cat([x for x, _, _ in parts]), torch.cat([m for _, m, _ in parts])


def augment(x0: torch.Tensor, mask: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample along time / height / width where ``flips [B, 3]`` says so (an exact permutation)."""
    x0, mask = x0.clone(), mask.clone()
    for axis in range(3):
        rows = flips[:, axis].to(x0.device)
        x0[rows] = x0[rows].flip(axis + 2)    # x0 [B, 16, F, H, W]
        mask[rows] = mask[rows].flip(axis + 1)  # mask [B, F, H, W]
    return x0, mask


def crop(x0: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], rng: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``size`` (cells) window of each clip, the same for latents and mask (an exact slice)."""
    height, width = x0.shape[-2:]
    tops = torch.randint(0, height - size[0] + 1, (x0.shape[0],), generator=rng).tolist()
    lefts = torch.randint(0, width - size[1] + 1, (x0.shape[0],), generator=rng).tolist()
    x0 = torch.stack([x[..., t:t + size[0], l:l + size[1]] for x, t, l in zip(x0, tops, lefts)])
    mask = torch.stack([m[..., t:t + size[0], l:l + size[1]] for m, t, l in zip(mask, tops, lefts)])
    return x0, mask


def save(model: torch.nn.Module, out: Path) -> dict[str, str]:
    """``save_pretrained`` into ``out`` with the weights renamed ``proxy.safetensors``; returns file -> SHA-256."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / DIFFUSERS_WEIGHTS_NAME).replace(out / WEIGHTS_NAME)
        (Path(tmp) / "config.json").replace(out / "config.json")
    for name in (WEIGHTS_NAME, "config.json"):
        (out / name).chmod(0o644)  # tempfile made them private
    sums = {name: sha256(out / name) for name in (WEIGHTS_NAME, "config.json")}
    (out / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def record_in_readme(proxy: str, command: str, sums: dict[str, str], log: dict) -> None:
    BEGIN, END = markers(proxy)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"warning: {README} has no {BEGIN} ... {END} block; not updated", file=sys.stderr)
        return
    block = "\n".join([
        BEGIN,
        "```bash",
        command,
        "```",
        "",
        f"- `proxy.safetensors` SHA-256: `{sums[WEIGHTS_NAME]}`",
        f"- `config.json` SHA-256: `{sums['config.json']}`",
        f"- trained in {log['wall_s'] / 60:.1f} min on {log['machine']}",
        f"- {log['parameters']:,} parameters; final training loss (mean of the last 100 steps) "
        f"{log['final_loss']:.4f}",
        END,
    ])
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + block + rest.split(END, 1)[1])


def main(argv=None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/proxy/train.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    start = time.perf_counter()

    x_pool, m_pool = make_pool(get_proxy(args.proxy).data.make_batch, args.pool, args.workers)  # before any GPU work: workers are forked
    gen_s = time.perf_counter() - start

    x_pool, m_pool = x_pool.to(device), m_pool.to(device)
    model = build_model(args.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    rng = torch.Generator().manual_seed(args.seed + 1)  # batches, flips, t, noise
    texts = {b: prompt_embeds(b).to(device) for b in {args.batch, args.crop_batch or args.batch}}

    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        cropping = step < args.crop_steps
        batch = (args.crop_batch or args.batch) if cropping else args.batch
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(args.pool, generator=rng)])
        index, order = order[:batch], order[batch:]
        flips = torch.rand(batch, 3, generator=rng) < 0.5
        x0, mask = x_pool[index], m_pool[index]
        if cropping:
            x0, mask = crop(x0, mask, tuple(args.crop_size), rng)
        x0, mask = augment(x0.to(device), mask.to(device), flips)
        t = shift_sigma(torch.rand(batch, generator=rng), args.shift)
        noise = torch.randn(x0.shape, generator=rng)
        t, noise = t.to(device), noise.to(device)
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        v = model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=texts[batch],
                  control_hidden_states=vace_control(x0, mask), return_dict=False)[0]
        weight = 1 + (args.mask_weight - 1) * mask.unsqueeze(1)
        loss = (weight * (v - (noise - x0)) ** 2).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", lr=f"{lr_at(step, args):.2e}")
        if time.perf_counter() - start > args.time_limit * 60:
            sys.exit(f"error: past --time-limit {args.time_limit} min at step {step + 1}/{args.steps}; nothing saved")

    wall_s = time.perf_counter() - start
    model.to("cpu").eval()
    sums = save(model, args.out)
    log = {
        "command": command, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": num_parameters(model), "wall_s": round(wall_s, 1), "clip_generation_s": round(gen_s, 1),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                           for i in range(0, len(losses), 100)],
        "machine": machine_description(), "sha256": sums,
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    if args.out.resolve() == get_proxy(args.proxy).weights_dir.resolve():
        record_in_readme(args.proxy, command, sums, log)
    size = (args.out / WEIGHTS_NAME).stat().st_size
    print(f"trained {args.steps} steps in {wall_s / 60:.1f} min (clips: {gen_s:.0f} s); "
          f"final loss {log['final_loss']:.4f}; {args.out / WEIGHTS_NAME}: {size / 1e6:.2f} MB, "
          f"sha256 {sums[WEIGHTS_NAME]}")


if __name__ == "__main__":
    main()
