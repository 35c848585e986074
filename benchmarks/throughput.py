"""Training-step throughput of pre-training models on the current device.

Times forward + backward + AdamW step on random images (no data loading), and the target alone,
then prints a table. ``--compare`` times several methods for the same encoder in one process,
interleaving their steps so that a busy machine slows them alike, and prints the time ratio next
to the FLOP ratio. Examples:

    python benchmarks/throughput.py --model vit_b --target hog --batch 8            # CPU
    python benchmarks/throughput.py --model vit_b --compare localmim,mae --batch 8  # ratio
    python benchmarks/throughput.py --model vit_b --batch 256 --precision bf16 --compile  # GPU
    python benchmarks/throughput.py --model vit_l --batch 128 --precision bf16 --grad-checkpointing
    python benchmarks/throughput.py --model vit_b --batch 256 --precision bf16 --profile 15
    python benchmarks/throughput.py --model vit_b --batch 256 --precision bf16 --batch-decoders

``--json`` writes the rows (and the profile's top kernels) to a file; ``benchmarks/gpu.py``
collects them for one GPU session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable

import torch
from hydra.utils import instantiate

from lmim import compose_config, create_pretrainer
from lmim.callbacks.perf import count_flops_per_image, peak_tflops
from lmim.module import param_groups


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: list[Callable[[], None]], steps: int, warmup: int, device: torch.device):
    """Median seconds per call of each function; after ``warmup`` untimed rounds, the functions
    take turns, one call each per round, so that load from elsewhere hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def setup(args: argparse.Namespace, method: str, device: torch.device) -> dict:
    """The model of one method, its optimiser, and closures for a training step and the target."""
    torch.manual_seed(0)
    options = {"img_size": args.img_size} if args.img_size else {}
    if args.batch_decoders:
        options["batch_decoders"] = True
    net = create_pretrainer(args.model, args.target, args.schedule, method=method, **options)
    net = net.to(device)
    if args.grad_checkpointing:
        net.encoder.set_grad_checkpointing(True)
    # The optimizer of conf/optim/adamw.yaml (fused AdamW, betas 0.9/0.95, wd 0.05).
    optim = instantiate(compose_config().optim.optimizer)
    opt = optim(param_groups(net, 0.05), lr=1e-4)
    size = net.encoder.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    model = torch.compile(net, mode=args.compile_mode) if args.compile else net

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

    target_name = type(net.target).__name__
    return {
        "net": net,
        "step": step,
        "target_only": target_only,
        "size": size,
        "target": target_name,
        "gflops": count_flops_per_image(net, args.batch, (3, size, size)) / 1e9,
    }


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    methods = args.compare.split(",") if args.compare else [args.method]
    runs = [setup(args, m, device) for m in methods]
    t_steps = timed([r["step"] for r in runs], args.steps, args.warmup, device)
    t_targets = timed([r["target_only"] for r in runs], args.steps, 1, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads"
    )
    rows = []
    for method, run, t_step, t_target in zip(methods, runs, t_steps, t_targets, strict=True):
        rows.append(
            {
                "method": method,
                "model": args.model,
                "target": run["target"],
                "img": run["size"],
                "batch": args.batch,
                "device": name,
                "precision": args.precision
                + (f" +compile({args.compile_mode or 'default'})" if args.compile else "")
                + (" +ckpt" if args.grad_checkpointing else ""),
                "GFLOP/img": run["gflops"],
                "ms/step": 1000 * t_step,
                "img/s": args.batch / t_step,
                "target ms": 1000 * t_target,
                "target share": t_target / t_step,
                "peak GiB": mem,
                "MFU": mfu(run["gflops"] * args.batch / t_step, name, args.precision),
            }
        )
    if args.profile:
        rows[0]["top kernels"] = profile(runs[0]["step"], args.profile, device)
    return rows


def mfu(gflop_per_s: float, device_name: str, precision: str) -> float:
    """Achieved / the device's dense peak (:data:`lmim.callbacks.perf.PEAK_TFLOPS`); NaN when the
    peak is not known (CPUs)."""
    lightning = {"32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[precision]
    peak = peak_tflops(device_name, lightning)
    return gflop_per_s / (peak * 1e3) if peak else float("nan")


def profile(step: Callable[[], None], top: int, device: torch.device) -> list[dict]:
    """The ``top`` kernels (GPU) or ops (CPU) by self time over 3 profiled steps, printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    rows = [
        {
            "name": e.key[:90],
            "calls/step": e.count / 3,
            "ms/step": getattr(e, key, 0.0) / 3 / 1000,
            "share": getattr(e, key, 0.0) / total,
        }
        for e in events[:top]
    ]
    print(f"top {top} by {key} (3 steps):")
    for r in rows:
        print(f"  {r['share']:6.1%} {r['ms/step']:8.2f} ms {r['calls/step']:6.0f}x  {r['name']}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_b")
    p.add_argument("--method", default="localmim", help="conf/method: localmim or mae")
    p.add_argument("--compare", default=None, help="methods to time together, e.g. localmim,mae")
    p.add_argument("--target", default=None, help="default: the method's (hog / pixel)")
    p.add_argument("--schedule", default=None, help="default: the method's")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the config's 224")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute encoder blocks (memory)"
    )
    p.add_argument(
        "--batch-decoders", action="store_true", help="model.batch_decoders: one batched block"
    )
    p.add_argument("--profile", type=int, default=0, help="print the top N kernels of a step")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    cols = [c for c in rows[0] if c != "top kernels"]
    fmt = {
        "GFLOP/img": "{:.1f}",
        "ms/step": "{:.1f}",
        "img/s": "{:.1f}",
        "target ms": "{:.1f}",
        "target share": "{:.1%}",
        "peak GiB": "{:.2f}",
        "MFU": "{:.1%}",
    }

    def show(r: dict, c: str) -> str:
        v = r[c]
        return "n/a" if isinstance(v, float) and v != v else fmt.get(c, "{}").format(v)

    cells = [[show(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if len(rows) > 1:
        a, *others = rows
        for b in others:
            print(
                f"{a['method']}/{b['method']} per step: {a['ms/step'] / b['ms/step']:.3f} "
                f"(FLOPs per image: {a['GFLOP/img']:.1f} / {b['GFLOP/img']:.1f} GFLOP = "
                f"{a['GFLOP/img'] / b['GFLOP/img']:.3f})"
            )
    return rows


if __name__ == "__main__":
    main()
