"""Training-step throughput of a LocalMIM pre-training model on the current device.

Times forward + backward + AdamW step on random images (no data loading), and the target alone,
then prints a table. Examples:

    python benchmarks/throughput.py --model vit_b --target hog --batch 8            # CPU
    python benchmarks/throughput.py --model vit_b --batch 256 --precision bf16 --compile  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from hydra.utils import instantiate

from lmim import compose_config, create_pretrainer
from lmim.module import param_groups


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    options = {"img_size": args.img_size} if args.img_size else {}
    net = create_pretrainer(args.model, args.target, args.schedule, **options).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The optimizer of conf/optim/adamw.yaml (fused AdamW, betas 0.9/0.95, wd 0.05).
    optim = instantiate(compose_config().optim.optimizer)
    opt = optim(param_groups(net, 0.05), lr=1e-4)
    size = net.encoder.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    model = torch.compile(net) if args.compile else net

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def step():
        with autocast():
            loss = model(images).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def target_only():
        with autocast():
            net.target(images)

    t_step = timed(step, args.steps, args.warmup, device)
    t_target = timed(target_only, args.steps, 1, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "model": args.model,
        "target": args.target or "default",
        "img": size,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "precision": args.precision + (" +compile" if args.compile else ""),
        "ms/step": 1000 * t_step,
        "img/s": args.batch / t_step,
        "target ms": 1000 * t_target,
        "target share": t_target / t_step,
        "peak GiB": mem,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_b")
    p.add_argument("--target", default=None, help="default: the model's (hog; hog18 for Swin)")
    p.add_argument("--schedule", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the config's 224")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    row = bench(args)
    cols = list(row)
    fmt = {
        "ms/step": "{:.1f}",
        "img/s": "{:.1f}",
        "target ms": "{:.1f}",
        "target share": "{:.1%}",
        "peak GiB": "{:.2f}",
    }
    cells = [fmt.get(c, "{}").format(row[c]) for c in cols]
    widths = [max(len(c), len(v)) for c, v in zip(cols, cells, strict=True)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    print(" | ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)))
    return row


if __name__ == "__main__":
    main()
