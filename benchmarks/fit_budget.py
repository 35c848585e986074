"""Short real fits of several methods with the device-hour accounting, on random images.

Each method trains for ``--steps`` optimizer steps under a real Lightning Trainer with
:class:`lmim.callbacks.PerfMonitor` (one random batch served again and again, so the loader costs
only the host-to-device copy), and the accounting's last window is printed: images/s per device,
MFU against the device's peak, peak memory, loader wait and the device-hours spent (the first
fit of a process also pays CUDA's start-up). Examples:

    python benchmarks/fit_budget.py --model vit_b --batch 128 --precision bf16-mixed   # one GPU
    python benchmarks/fit_budget.py --model vit_test --img-size 64 --batch 8 --steps 5  # CPU
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lmim import create_pretrainer
from lmim.callbacks import PerfMonitor
from lmim.callbacks.perf import DEVICE_HOURS
from lmim.module import LocalMIMModule


class RandomBatches(Dataset):
    """``n`` copies of one random batch: no decoding, augmentation or collation cost."""

    def __init__(self, n: int, batch: int, size: int) -> None:
        self.batch = torch.randn(batch, 3, size, size)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch


class RandomData(L.LightningDataModule):
    def __init__(self, n: int, size: int, batch_size: int) -> None:
        super().__init__()
        self.n, self.img_size, self.batch_size = n, size, batch_size

    def train_dataloader(self) -> DataLoader:
        batches = RandomBatches(self.n // self.batch_size, self.batch_size, self.img_size)
        return DataLoader(batches, batch_size=None, pin_memory=torch.cuda.is_available())


def fit(args: argparse.Namespace, method: str, out: str) -> dict:
    torch.manual_seed(0)
    options = {"img_size": args.img_size} if args.img_size else {}
    net = create_pretrainer(args.model, method=method, **options)
    size = net.encoder.img_size
    module = LocalMIMModule(net, optimizer=torch.optim.AdamW, warmup_steps=1)
    perf = PerfMonitor(window=max(2, args.steps // 2))
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=CSVLogger(out, name=method, version=""),
        callbacks=[perf],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=RandomData(args.steps * args.batch, size, args.batch))
    wall = time.perf_counter() - t0
    last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    return {
        "method": method,
        "device": perf.device_name,
        "precision": args.precision,
        "batch": args.batch,
        "GFLOP/img": (perf.flops_per_image or float("nan")) / 1e9,
        "img/s/device": last.get("perf/images_per_sec_per_device", float("nan")),
        "MFU": last.get("perf/mfu", float("nan")),
        "peak TFLOP/s": perf.peak_tflops or float("nan"),
        "max GiB": last.get("perf/max_memory_gb", float("nan")),
        "loader wait": last.get("perf/data_wait_frac", float("nan")),
        "device-hours": perf.summary[DEVICE_HOURS],
        "fit s": wall,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_b")
    p.add_argument("--methods", default="localmim,mae")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32")
    p.add_argument("--out", default="/tmp/lmim_fit_budget")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    rows = [fit(args, m, args.out) for m in args.methods.split(",")]
    for r in rows:
        print(
            " | ".join(
                f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items()
            )
        )
    if len(rows) > 1:
        a, b = rows[0], rows[1]
        print(
            f"{a['method']}/{b['method']} images/s per device: "
            f"{a['img/s/device'] / b['img/s/device']:.3f} (inverse of the step-time ratio)"
        )
    return rows


if __name__ == "__main__":
    main()
