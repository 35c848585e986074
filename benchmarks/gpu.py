"""One GPU session for issue 13: every figure of its table in under 10 minutes, as one JSON and
one markdown table.

Runs, in order of importance, each in its own process with a time limit (what is left of
``--budget-s`` decides whether the next one starts):

1. ``fit``: a real ``python -m lmim.train`` fit of ViT-B/16 LocalMIM (HOG), batch 256, bf16,
   ``callbacks=default``, data from ``data=resident`` (one uint8 batch of real views kept on
   the GPU): images/s per device, MFU and peak memory of the accounting's last window;
2. ``fit mae``: MAE ViT-B in the same harness;
3. ``syncs``: host synchronisations per step (``callbacks=sync_check``, eager, batch 64);
4. model steps (fwd + bwd + fused AdamW, no Lightning, ``benchmarks/throughput.py``): ViT-B,
   ViT-B with its decoders as one batched block (``model.batch_decoders``), Swin-B, ViT-L at
   batch 128 with and without activation checkpointing;
5. the top kernels of a ViT-B step (``torch.profiler``), and the rescale heads channels-last
   against their NCHW modules (``benchmarks/heads.py``);
6. the compiled ones last (compiling takes minutes): ``fit+compile`` (item 1 with
   ``compile.enabled=true``) and the compiled ViT-B model step.

Usage on a GPU machine: ``bash benchmarks/gpu.sh [outdir]`` (this script with ``--out``).
``--smoke`` runs the same items at toy sizes on any machine (a dry run on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; (exit status, seconds). 124 on a timeout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
    }
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def last_window(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of each perf/* and train/loss column of a Lightning CSV."""
    found: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None) and (k.startswith("perf/") or k == "train/loss"):
                    found[k] = float(v)
    return found


def slug(name: str) -> str:
    """An item's name as a file name."""
    return name.replace(" ", "_").replace("+", "_")


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.smoke = args.smoke

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def item(self, name: str, cmd: list[str], need: float, limit: float) -> dict | None:
        """Run one item if ``need`` seconds are left; its row (status, log), appended to the
        report, or None when skipped."""
        log = self.out / f"{slug(name)}.log"
        if self.left() < need:
            self.rows.append({"item": name, "status": f"skipped ({self.left():.0f} s left)"})
            return None
        rc, secs = run(cmd, min(limit, self.left()), log)
        print(f"{name}: exit {rc} in {secs:.0f} s ({log.name})", flush=True)
        row = {"item": name, "status": "ok" if rc == 0 else f"exit {rc}", "log": log.name}
        self.rows.append(row)
        return row

    def train_cmd(self, run_dir: Path, batch: int, steps: int, log_every: int, *extra: str):
        """``python -m lmim.train``: ViT-B LocalMIM (HOG) on ``data=resident``, CSV logs."""
        if self.smoke:  # the test ViT at 32 px on the CPU
            sizes = ["model=vit_test", "data.img_size=32", "trainer=cpu"]
        else:
            sizes = ["model=vit_b", "trainer=gpu"]
        return [
            sys.executable,
            "-m",
            "lmim.train",
            *sizes,
            "target=hog",
            "data=resident",
            f"data.batch_size={batch}",
            f"data.samples_per_epoch={batch * steps}",
            f"trainer.precision={self.args.precision}",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=1",
            f"trainer.log_every_n_steps={log_every}",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "callbacks.last_checkpoint.every_n_train_steps=100000",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]

    # -- items ---------------------------------------------------------------------------

    def fit(self, name: str, *extra: str, limit: float | None = None) -> None:
        a = self.args
        run_dir = self.out / slug(name)
        cmd = self.train_cmd(
            run_dir, a.batch, a.fit_steps, a.log_every, f"callbacks.perf.window={a.window}", *extra
        )
        row = self.item(name, cmd, need=5 if self.smoke else 60, limit=limit or a.item_s)
        csvs = sorted(run_dir.glob("csv/metrics.csv"))
        if row is not None and csvs:
            m = last_window(csvs[0])
            row.update(
                {
                    "img/s": m.get("perf/images_per_sec_per_device"),
                    "MFU": m.get("perf/mfu"),
                    "peak GiB": m.get("perf/max_memory_gb"),
                    "loader wait": m.get("perf/data_wait_frac"),
                    "loss": m.get("train/loss"),
                }
            )

    def syncs(self) -> None:
        run_dir = self.out / "syncs"
        cmd = self.train_cmd(run_dir, 4 if self.smoke else 64, 12, 6, "callbacks=sync_check")
        row = self.item("syncs", cmd, need=5 if self.smoke else 40, limit=self.args.item_s)
        report = run_dir / "host_syncs.json"
        if row is not None and report.exists():
            r = json.loads(report.read_text())
            row["syncs/step"] = r["summary"]["host_syncs_per_other_step"]
            row["syncs/logging step"] = r["summary"]["host_syncs_per_logging_step"]
            row["unexpected"] = sorted({f"{e['kind']} at {e['where']}" for e in r["unexpected"]})

    def step(
        self, name: str, model: str, batch: int, *extra: str, limit: float | None = None
    ) -> None:
        a = self.args
        path = self.out / f"{slug(name)}.json"
        size = ["--model", "vit_test", "--img-size", "32"] if self.smoke else ["--model", model]
        cmd = [
            sys.executable,
            "benchmarks/throughput.py",
            *size,
            "--batch",
            str(4 if self.smoke else batch),
            "--precision",
            "32" if self.smoke else "bf16",
            "--steps",
            str(a.step_steps),
            "--warmup",
            "3",
            "--json",
            str(path),
            *extra,
        ]
        row = self.item(name, cmd, need=5 if self.smoke else 30, limit=limit or a.item_s)
        if row is not None and path.exists():
            r = json.loads(path.read_text())[0]
            row.update({k: r[k] for k in ("img/s", "MFU", "peak GiB", "target ms")})
            if "top kernels" in r:
                row["top kernels"] = r["top kernels"]

    def heads(self) -> None:
        """The rescale heads channels-last against their NCHW modules (benchmarks/heads.py)."""
        path = self.out / "heads.json"
        sizes = ["vit_test", "4", "32"] if self.smoke else ["vit_b", "256", "bf16"]
        cmd = [sys.executable, "benchmarks/heads.py"]
        cmd += [f"--{k}={v}" for k, v in zip(("model", "batch", "precision"), sizes, strict=True)]
        row = self.item("heads", [*cmd, "--json", str(path)], need=5 if self.smoke else 20,
                        limit=self.args.item_s)  # fmt: skip
        if row is not None and path.exists():
            row["heads"] = json.loads(path.read_text())

    # -- report --------------------------------------------------------------------------

    def write(self) -> None:
        import timm
        import torch

        info = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "batch": self.args.batch,
            "precision": self.args.precision,
            "smoke": self.smoke,
            "seconds": time.perf_counter() - self.t0,
        }
        (self.out / "gpu.json").write_text(json.dumps({"info": info, "rows": self.rows}, indent=1))
        cols = [
            "item", "status", "img/s", "MFU", "peak GiB", "target ms", "loader wait", "syncs/step"
        ]  # fmt: skip

        def cell(v, col: str) -> str:
            if v is None:
                return ""
            if isinstance(v, float):
                if math.isnan(v):
                    return "n/a"
                return f"{v:.1%}" if col in ("MFU", "loader wait") else f"{v:,.1f}"
            return str(v)

        lines = [
            f"{info['device']}, torch {info['torch']}, timm {info['timm']}, "
            f"{info['precision']}, {info['seconds']:.0f} s" + (" (smoke)" if self.smoke else ""),
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        for r in self.rows:
            values = [r.get(c) for c in cols]
            if r["item"] == "syncs" and r.get("syncs/step") is not None:
                values[cols.index("syncs/step")] = f"{r['syncs/step']:g}"
            cells = [cell(v, c) for v, c in zip(values, cols, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
        for r in self.rows:
            if r.get("heads"):
                lines += ["", "Rescale heads, forward + backward (benchmarks/heads.py):", ""]
                lines += [
                    f"- x{h['scale']:g}, batch {h['batch']}, {h['precision']}: NCHW modules "
                    f"{h['nchw ms']:.2f} ms, channels-last {h['tokens ms']:.2f} ms"
                    for h in r["heads"]
                ]
        for r in self.rows:
            if r.get("top kernels"):
                lines += ["", f"Top kernels of {r['item']}:", ""]
                lines += [
                    f"- {k['share']:.1%} {k['ms/step']:.2f} ms/step, {k['calls/step']:.0f} "
                    f"calls: `{k['name']}`"
                    for k in r["top kernels"]
                ]
        (self.out / "gpu.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/lmim_gpu"))
    p.add_argument("--budget-s", type=float, default=560, help="no item starts after this")
    p.add_argument("--item-s", type=float, default=200, help="time limit of one item")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--fit-steps", type=int, default=120)
    p.add_argument("--log-every", type=int, default=40)
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--step-steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (dry run)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.precision, args.fit_steps, args.log_every, args.window = 4, "32", 6, 3, 3
        args.step_steps = 2
    s = Session(args)
    # The compiled items last: compiling takes minutes, the eager ones a few seconds each.
    compiled = ["compile.enabled=true"] + (["compile.backend=aot_eager"] if args.smoke else [])
    s.fit("fit")
    s.fit("fit mae", "method=mae")
    s.syncs()
    s.step("step vit_b", "vit_b", 256)
    s.step("step vit_b+batched", "vit_b", 256, "--batch-decoders")
    s.step("step swin_b", "swin_b", 256)
    s.step("step vit_l", "vit_l", 128)
    s.step("step vit_l+ckpt", "vit_l", 128, "--grad-checkpointing")
    s.step("profile vit_b", "vit_b", 256, "--profile", "15")
    s.heads()
    s.fit("fit+compile", *compiled, limit=300)
    if not args.smoke:  # inductor on a CPU takes minutes even for the toy model
        s.step("step vit_b+compile", "vit_b", 256, "--compile", limit=240)
    s.write()


if __name__ == "__main__":
    main()
