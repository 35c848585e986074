"""LocalMIM against MAE for equal device time (and equal steps) on Fashion-MNIST, on this CPU.

A ViT 192 wide x 8 deep x 3 heads with 8-px patches on Fashion-MNIST at 64 px
(``experiment=fmnist_budget``) is pre-trained by each arm for the same device-minutes, through
``python -m lmim.train`` (real Lightning fits, offline W&B and CSV logs). The arms:

* ``localmim-released``: LocalMIM with the released decoders (256 wide, 8 heads, one block);
* ``localmim-sized``: LocalMIM with decoders sized to this encoder: 64 wide, 2 heads (the
  released 256/768 width ratio of ViT-B applied to 192; head width 32 as released), which also
  makes the x4 head's transposed convolutions 4x narrower;
* ``mae-released``: MAE with its released decoder (8 blocks x 512 x 16 heads);
* ``mae-sized``: MAE with a 2-block x 128 x 4-head decoder;
* named with ``--arms`` only, LocalMIM's ablations with the sized decoders:
  ``localmim-single-scale`` (every tap at the mask unit's scale), ``localmim-top-only`` (one
  decoder on the top block) and ``localmim-isolated`` (gradient-isolated segments);
* with ``--targets``, instead of the arms: ``localmim-sized`` with each named target
  (``localmim-sized-hog``, ``-pixel``, ``-codebook``, ``-teacher``). Their inputs are made
  first and timed apart from the budget: the codebook by ``python -m lmim.codebook`` on the
  training images (HOG at the taps' cells, ``--codebook-codes`` codes); the teacher by an
  ``mae-sized`` pre-training of ``--teacher-minutes`` (seed ``--teacher-seed``) exported with
  ``python -m lmim.export`` and loaded as the timm ViT of its architecture from that weights
  file. The teacher's forward runs inside every training step, so it is in the arm's device
  time; its own pre-training is reported beside it, with its accuracy.

Every arm of a seed starts from the same encoder weights. Each arm's step time is measured
first and its cosine is set to end at the budget; the weights are saved at 40/60/80/100% of it
(6/9/12/15 minutes for ``--minutes 15``). Each checkpoint is then evaluated on frozen features
of the last and the middle block: weighted cosine 20-NN and a linear probe (BatchNorm without
affine + Linear, fitted by L-BFGS). Then the equal-steps runs (``--equal-steps-arms`` trained
for the steps ``localmim-sized`` made in the budget) and short fine-tunes of each final encoder
against the same fine-tune from random weights (``python -m lmim.finetune``). Written to
``--out``: ``results.md`` and ``results.json`` (every evaluation, mean and range over seeds,
random-init, raw-pixel and from-scratch levels, the device-minutes LocalMIM needed to pass each
MAE arm's final accuracy) and, through ``lmim.report``, ``report/budget.png`` and
``report/budget.md``. With ``--analyze``, ``python -m lmim.analyze`` also scores each seed's
final encoders and initial weights (NMI and attention distance per block, attention maps) into
``analysis/``, and the tables gain the per-block means over seeds.

    python benchmarks/budget.py                    # 5-minute budget, 2 seeds: ~80 min, 2 cores
    python benchmarks/budget.py --minutes 15       # the 6/9/12/15-minute points: ~2.5 h
    python benchmarks/budget.py --minutes 0.3 --seeds 0 --eval-train 500 --eval-test 500 \\
        --finetune-images 256 --finetune-test 256 --out /tmp/budget   # a smoke run
    python benchmarks/budget.py --minutes 10 --out outputs/ablations --arms localmim-sized \\
        mae-sized localmim-single-scale localmim-top-only localmim-isolated \\
        --equal-steps-arms --finetune-epochs 0 --eval-points last --analyze   # the ablation study
    python benchmarks/budget.py --targets hog,pixel,codebook,teacher --finetune-epochs 0 \
        --out outputs/targets                                               # the target study

Finished stages are kept: re-running the same command after an interruption skips them (a timed
run that did not finish is started again from scratch, since a resumed one would not be timed
alike).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lmim.api import compose_config
from lmim.data.fashion_mnist import find_root
from lmim.evaluation import extract_layer_features, knn_accuracy, linear_probe_accuracy
from lmim.export import load_pretrainer
from lmim.report import EVALS_FILE, read_evals
from lmim.utils import instantiate_checked, weights_digest

SIZED = ["method=localmim", "model.decoder_dim=64", "model.decoder_heads=2"]
ARMS: dict[str, list[str]] = {
    "localmim-released": ["method=localmim"],
    "localmim-sized": SIZED,
    "mae-released": ["method=mae"],
    "mae-sized": [
        "method=mae",
        "model.decoder_dim=128",
        "model.decoder_depth=2",
        "model.decoder_heads=4",
    ],
    # LocalMIM's ablations (section 6), with the sized decoders: every tap at the mask unit's
    # scale, one decoder on the top block, and the gradient-isolated variant.
    "localmim-single-scale": [*SIZED, "schedule=single_scale"],
    "localmim-top-only": [*SIZED, "schedule=top_only"],
    "localmim-isolated": [*SIZED, "schedule=isolated"],
}
# The four arms a plain run trains; the ablation arms only when named with --arms.
DEFAULT_ARMS = ["localmim-released", "localmim-sized", "mae-released", "mae-sized"]
# --targets: localmim-sized with each target; codebook and teacher get their files' overrides
# from prepare_targets.
TARGETS = ("hog", "pixel", "codebook", "teacher")
TARGET_ARMS = {f"localmim-sized-{t}": [*SIZED, f"target={t}"] for t in TARGETS}
TEACHER_ARM = "mae-sized"
# The timm model the teacher is built as (its architecture comes from the exported encoder).
TEACHER_TIMM = "vit_tiny_patch16_224"
FRACTIONS = (0.4, 0.6, 0.8, 1.0)
EVAL_KEYS = ("knn_last", "knn_mid", "linear_last", "linear_mid")
EVAL_NAMES = {
    "knn_last": "20-NN, last block",
    "knn_mid": "20-NN, middle block",
    "linear_last": "linear probe, last block",
    "linear_mid": "linear probe, middle block",
}


def log(msg: str) -> None:
    print(f"[budget {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- pre-training ----------------------------------------------------------------------------


def experiment_overrides(args: argparse.Namespace, arm: str) -> list[str]:
    prepared = getattr(args, "target_overrides", {}).get(arm, [])
    arm_overrides = TARGET_ARMS[arm] if arm in TARGET_ARMS else ARMS[arm]
    return ["experiment=fmnist_budget", *arm_overrides, *prepared, *args.override]


def calibrate(args: argparse.Namespace, arm: str) -> float:
    """Seconds per optimizer step of an arm: its model and optimizer on batches from the real
    training loader (augmentation in a worker, as in the runs), the median of
    ``--calibration-steps`` steps after a warm-up one."""
    cfg = compose_config(experiment_overrides(args, arm) + [f"data.batch_size={args.batch}"])
    net = instantiate_checked(cfg.model)
    dm = instantiate_checked(cfg.data, seed=0)
    batches = iter(dm.train_dataloader())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(args.calibration_steps + 1):
        t = time.perf_counter()
        batch = next(batches)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        net(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_train(overrides: list[str], run_dir: Path) -> dict:
    """One ``python -m lmim.train`` run in ``run_dir``; returns its points.json entries by name.
    A folder left by an unfinished run is removed first (timed runs are not resumed)."""
    points = run_dir / "checkpoints" / "points.json"
    if points.is_file() and any(p["name"] == "end" for p in json.loads(points.read_text())):
        log(f"kept {run_dir}")
        return {p["name"]: p for p in json.loads(points.read_text())}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "lmim.train", *overrides, f"hydra.run.dir={run_dir}"]
    log("run: " + " ".join(cmd[1:]))
    run_dir.mkdir(parents=True)
    env = {**os.environ, "WANDB_SILENT": "true"}
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {run_dir}.log")
    return {p["name"]: p for p in json.loads(points.read_text())}


def train_overrides(args, arm: str, seed: int, steps: int, minutes: list[float], stop: bool):
    budget_label = f"{minutes[-1]:g}min" if stop else f"{steps}steps"
    return [
        *experiment_overrides(args, arm),
        f"seed={seed}",
        f"labels.method={arm}",
        f"labels.budget={budget_label}",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={steps}",
        f"optim.warmup_steps={min(args.warmup_steps, steps // 5)}",
        f"callbacks.budget.minutes=[{','.join(f'{m:g}' for m in minutes)}]",
        f"callbacks.budget.stop_at_last={str(stop).lower()}",
        "resume=false",
    ]


# ---- target inputs (--targets) ---------------------------------------------------------------


def _hydra_value(v) -> str:
    """A Python value as a Hydra override value (null, true, 4.0, "name", [2, 2])."""
    return json.dumps(list(v) if isinstance(v, tuple) else v)


# The groups experiment=fmnist_budget picks, for entry points without an experiment group.
EXPERIMENT_GROUPS = ["data=fashion_mnist", "model=vit_tiny"]


def codebook_overrides(args: argparse.Namespace) -> list[str]:
    """``python -m lmim.codebook`` overrides giving the budget model's taps and images: the
    experiment's groups, its encoder settings (read from the composed run config) and the
    run's own data and model overrides."""
    encoder = compose_config(experiment_overrides(args, "localmim-sized-hog")).model.encoder
    settings = [
        f"model.encoder.{k}={_hydra_value(v)}"
        for k, v in OmegaConf.to_container(encoder, resolve=True).items()
        if not k.startswith("_") and k != "img_size"
    ]
    own = [o for o in args.override if o.split("=", 1)[0].split(".")[0] in ("data", "model")]
    return [
        *EXPERIMENT_GROUPS,
        *settings,
        "target.base=hog",
        f"target.codes={args.codebook_codes}",
        f"images={args.codebook_images}",
        *own,
    ]


def _run_cli(cmd: list[str], logfile: Path, what: str) -> None:
    log("run: " + " ".join(cmd[1:]))
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see {logfile}")


def prepare_targets(args: argparse.Namespace, out: Path, calib: dict, calib_path: Path) -> dict:
    """Make the files the ``--targets`` arms read (kept when a re-run finds them) and set
    ``args.target_overrides``; returns what each cost, timed apart from the arms' budgets.

    * codebook: ``python -m lmim.codebook`` over HOG at the taps' cells of the training images;
    * teacher: ``mae-sized`` pre-trained for ``--teacher-minutes`` (seed ``--teacher-seed``),
      exported by ``python -m lmim.export`` and loaded from that file as the timm ViT of its
      architecture.
    """
    from lmim.export import timm_architecture

    folder = out / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    args.target_overrides, prep = {}, {}
    if "codebook" in args.targets:
        path, summary = folder / "codebook.pt", folder / "codebook.json"
        if not summary.is_file():
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "lmim.codebook", *codebook_overrides(args)]
            cmd += [f"out={path}", f"hydra.run.dir={folder / 'codebook_run'}"]
            _run_cli(cmd, folder / "codebook.log", "fitting the codebook")
            book = torch.load(path, map_location="cpu", weights_only=True)
            summary.write_text(
                json.dumps(
                    {
                        "wall_minutes": (time.perf_counter() - t) / 60,
                        "codes": args.codebook_codes,
                        "images": args.codebook_images,
                        "cell_sizes": book["cell_sizes"],
                        "usage": book["usage"],
                    },
                    indent=1,
                )
            )
        prep["codebook"] = json.loads(summary.read_text())
        args.target_overrides["localmim-sized-codebook"] = [
            f"target.path={path}",
            "target.base=hog",
        ]
    if "teacher" in args.targets:
        key = f"teacher:{TEACHER_ARM}"
        if key not in calib:
            calib[key] = calibrate(args, TEACHER_ARM)
            log(f"{key}: {calib[key]:.3f} s/step")
            calib_path.write_text(json.dumps(calib, indent=1))
        steps = max(1, math.floor(args.margin * 60 * args.teacher_minutes / calib[key]))
        run_dir = folder / "teacher-run"
        points = run_train(
            train_overrides(
                args, TEACHER_ARM, args.teacher_seed, steps, [args.teacher_minutes], True
            ),
            run_dir,
        )
        weights = folder / "teacher.pth"
        if not weights.is_file():
            cmd = [
                sys.executable,
                "-m",
                "lmim.export",
                points["end"]["path"],
                "--out",
                str(weights),
            ]
            _run_cli(cmd, folder / "export.log", "exporting the teacher")
        _, arch = timm_architecture(load_pretrainer(points["end"]["path"]).encoder)
        kwargs = {k: v for k, v in arch.items() if k != "img_size"}
        kw = ",".join(f"{k}:{_hydra_value(v)}" for k, v in kwargs.items())
        args.target_overrides["localmim-sized-teacher"] = [
            f"target.model={TEACHER_TIMM}",
            f"target.checkpoint_path={weights}",
            f"target.model_kwargs={{{kw}}}",
        ]
        prep["teacher"] = {
            "arm": TEACHER_ARM,
            "seed": args.teacher_seed,
            "device_minutes": 60 * points["end"]["device_hours"],
            "steps": points["end"]["step"],
            "timm_model": TEACHER_TIMM,
            "model_kwargs": kwargs,
            "file": str(weights),
            "run_dir": str(run_dir),
            "points": points,
        }
    return prep


# ---- evaluation ------------------------------------------------------------------------------


class EvalData:
    """The labelled images every checkpoint is evaluated on, decoded once (deterministic)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lmim.data.fashion_mnist import FashionMNISTDataModule

        dm = FashionMNISTDataModule(root=args.data_root, img_size=args.img_size, batch_size=256)
        self.num_classes = dm.num_classes
        self.bf16 = args.eval_bf16

        def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            ds = dm.eval_dataset(split, n)
            x, y = zip(*(ds[i] for i in range(len(ds))), strict=True)
            return torch.stack(x), torch.tensor(y)

        self.train = load("train", args.eval_train)
        self.test = load("test", args.eval_test)

    def loader(self, split: str) -> DataLoader:
        x, y = self.train if split == "train" else self.test
        return DataLoader(list(zip(x, y, strict=True)), batch_size=256)


def evaluate_encoder(encoder, data: EvalData, mid: int) -> dict[str, float]:
    """20-NN and linear-probe top-1 (%) at the last and the ``mid`` block."""
    # bf16 on CPUs with AMX/AVX512-BF16 (2.5x faster here); the features come out float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=data.bf16):
        (tr_last, tr_mid), ytr = extract_layer_features(encoder, data.loader("train"), [-1, mid])
        (te_last, te_mid), yte = extract_layer_features(encoder, data.loader("test"), [-1, mid])
    out = {}
    for name, tr, te in (("last", tr_last, te_last), ("mid", tr_mid, te_mid)):
        out[f"knn_{name}"] = 100 * knn_accuracy(tr, ytr, te, yte, data.num_classes)
        out[f"linear_{name}"] = 100 * linear_probe_accuracy(tr, ytr, te, yte, data.num_classes)
    return out


def raw_pixel_levels(data: EvalData) -> dict[str, float]:
    """The same k-NN and probe on the raw (normalised, one-channel) pixels."""
    tr, te = data.train[0][:, 0].flatten(1), data.test[0][:, 0].flatten(1)
    ytr, yte = data.train[1], data.test[1]
    return {
        "knn": 100 * knn_accuracy(tr, ytr, te, yte, data.num_classes),
        "linear": 100 * linear_probe_accuracy(tr, ytr, te, yte, data.num_classes),
    }


def evaluate_run(
    run_dir: Path, points: dict, data: EvalData, cache: dict, last_only: bool = False
) -> list[dict]:
    """Evaluate every budget checkpoint of a run (``last_only``: the initialisation and the
    last one); rows also go to ``<run>/evals.csv`` (read by ``lmim.report``). ``cache`` maps an
    encoder-weights digest to its result, so the shared initialisation is evaluated once per
    seed."""
    csv_path = run_dir / EVALS_FILE
    if csv_path.is_file():
        return [{k: _num(v) for k, v in r.items()} for r in read_evals(run_dir)]
    rows = []
    todo = [
        (name, p)
        for name, p in points.items()
        # the last budget point is the end of training
        if not (
            name == "end"
            and any(q["step"] == p["step"] for n, q in points.items() if n not in ("end", "start"))
        )
    ]
    if last_only:
        todo = [todo[0], todo[-1]] if len(todo) > 1 else todo
    for name, p in todo:
        net = load_pretrainer(p["path"])
        digest = weights_digest(net.encoder)
        if digest not in cache:
            t = time.perf_counter()
            cache[digest] = evaluate_encoder(net.encoder, data, net.encoder.depth // 2 - 1)
            log(
                f"  {run_dir.name} {name} step {p['step']}: {_fmt_row(cache[digest])} "
                f"({time.perf_counter() - t:.0f} s)"
            )
        rows.append(
            {
                "name": name,
                "budget_minutes": p["budget_minutes"],
                "perf/device_hours": p["device_hours"],
                "trainer/global_step": p["step"],
                **{f"eval/{k}_top1": v for k, v in cache[digest].items()},
            }
        )
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _fmt_row(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in r.items())


# ---- fine-tuning -----------------------------------------------------------------------------


def run_finetune(args, run_dir: Path, source: list[str]) -> float:
    """A short ``python -m lmim.finetune`` (recipe=small and ``--finetune-override``); returns
    the test top-1 (%)."""
    result = run_dir / "top1.json"
    if result.is_file():
        return json.loads(result.read_text())["top1"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "lmim.finetune",
        *source,
        "recipe=small",
        f"data.img_size={args.img_size}",
        f"data.train_limit={args.finetune_images}",
        f"data.test_limit={args.finetune_test}",
        f"data.batch_size={args.finetune_batch}",
        f"trainer.max_epochs={args.finetune_epochs}",
        "finetune.warmup_epochs=0.5",
        *args.finetune_override,
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
    ]
    log("run: " + " ".join(cmd[1:]))
    with open(run_dir / "stdout.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    text = (run_dir / "stdout.log").read_text()
    if proc.returncode or "val/top1:" not in text:
        raise SystemExit(f"fine-tuning failed (exit {proc.returncode}); see {run_dir}/stdout.log")
    top1 = 100 * float(text.rsplit("val/top1:", 1)[1].split()[0])
    result.write_text(json.dumps({"top1": top1}))
    return top1


# ---- attention analysis ----------------------------------------------------------------------


def run_analysis(args, out: Path, points_by_run: dict, seed: int) -> dict:
    """``python -m lmim.analyze`` on the seed's final encoder of every arm and on its initial
    weights (``budget_start.ckpt``, shared by the arms), on ``--analysis-images`` test images;
    returns its ``analysis.json``."""
    run_dir = out / "analysis" / f"s{seed}"
    result = run_dir / "analysis.json"
    if result.is_file():
        return json.loads(result.read_text())
    ckpts = [points_by_run[arm, seed]["end"]["path"] for arm in args.arms]
    ckpts.append(points_by_run[args.arms[0], seed]["start"]["path"])
    cmd = [
        sys.executable,
        "-m",
        "lmim.analyze",
        f"checkpoints=[{','.join(map(str, ckpts))}]",
        f"labels=[{','.join([*args.arms, 'random init'])}]",
        "data=fashion_mnist",
        f"data.img_size={args.img_size}",
        *([f"data.root={args.data_root}"] if args.data_root else []),
        f"num_images={args.analysis_images}",
        "maps.images=2",
        f"hydra.run.dir={run_dir}",
    ]
    log("run: " + " ".join(cmd[1:]))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode or not result.is_file():
        raise SystemExit(f"analysis failed (exit {proc.returncode}); see {run_dir}/stdout.log")
    return json.loads(result.read_text())


def summarise_analysis(records: list[dict]) -> dict:
    """Per encoder label and layer, NMI and attention distance as mean (min–max) over seeds."""
    out: dict = {}
    for label in records[0]["encoders"]:
        per_seed = [r["encoders"][label] for r in records]
        out[label] = {
            key: [stats([s[key][i] for s in per_seed]) for i in range(len(per_seed[0][key]))]
            for key in ("nmi", "distance")
        }
    return out


def plot_analysis(summary: dict, key: str, ylabel: str, path: Path) -> None:
    """One line per encoder (mean over seeds), shaded between the seeds' min and max."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for label, v in summary.items():
        xs = range(1, len(v[key]) + 1)
        line = ax.plot(xs, [s["mean"] for s in v[key]], marker="o", ms=3, label=label)
        lo, hi = [s["min"] for s in v[key]], [s["max"] for s in v[key]]
        ax.fill_between(xs, lo, hi, color=line[0].get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=130)


# ---- summary ---------------------------------------------------------------------------------


def stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def minutes_to_reach(curve: list[tuple[float, float]], level: float) -> float | None:
    """Device-minutes at which a mean accuracy curve [(minutes, acc)] first reaches ``level``,
    linearly interpolated between evaluated points; None if it never does."""
    if curve and curve[0][1] >= level:
        return curve[0][0]
    for (m0, a0), (m1, a1) in zip(curve, curve[1:], strict=False):
        if a1 >= level:
            return m1 if a1 == a0 or a0 >= level else m0 + (level - a0) / (a1 - a0) * (m1 - m0)
    return None


def summarise(args, calib, equal_time, equal_steps, init, raw, finetunes, steps_eq) -> dict:
    points = [f * args.minutes for f in FRACTIONS]
    table: dict = {}
    evaluated = list(enumerate(points))
    if args.eval_points == "last":
        evaluated = evaluated[-1:]
    for arm in args.arms:
        table[arm] = {}
        for i, m in evaluated:
            # a run whose cosine ended before a point holds its final encoder there
            rows = [runs[min(i + 1, len(runs) - 1)] for runs in equal_time[arm].values()]
            rows = [r for r in rows if r["name"] != "start"]
            if not rows:
                continue
            table[arm][f"{m:g}"] = {
                "device_minutes": stats([60 * r["perf/device_hours"] for r in rows]),
                "steps": stats([r["trainer/global_step"] for r in rows]),
                **{k: stats([r[f"eval/{k}_top1"] for r in rows]) for k in EVAL_KEYS},
            }
    crossing: dict = {}
    for lm in [a for a in args.arms if a.startswith("localmim")]:
        for mae in [a for a in args.arms if a.startswith("mae")]:
            for k in EVAL_KEYS:
                if not table[mae] or not table[lm]:
                    continue
                final = table[mae][max(table[mae], key=float)][k]["mean"]
                curve = [(0.0, init[k]["mean"])] + [
                    (v["device_minutes"]["mean"], v[k]["mean"]) for v in table[lm].values()
                ]
                m = minutes_to_reach(curve, final)
                crossing[f"{lm} vs {mae}: {k}"] = {"mae_final": final, "minutes": m}
    return {
        "minutes": args.minutes,
        "points": points,
        "seeds": args.seeds,
        "calibration_s_per_step": calib,
        "equal_time": table,
        "init": init,
        "raw_pixels": raw,
        "crossing": crossing,
        "equal_steps": {"steps": steps_eq, **equal_steps},
        "finetune": finetunes,
    }


def target_inputs_markdown(prep: dict) -> list[str]:
    """The ``--targets`` inputs: what making the codebook and the teacher cost (outside the
    arms' budgets), code usage, and the teacher's own accuracy."""
    if not prep:
        return []
    lines = [
        "",
        "## Target inputs (made before the runs, not in their device time)",
        "",
    ]
    if "codebook" in prep:
        c = prep["codebook"]
        lines += [
            f"Codebook: `python -m lmim.codebook` over HOG on {c['images']} training views, "
            f"{c['codes']} codes per scale, {c['wall_minutes']:.1f} wall-minutes.",
            "",
            "| cells | cells fitted | perplexity | dead codes | k-means objective |",
            "|---|---|---|---|---|",
        ]
        for size, u in zip(c["cell_sizes"], c["usage"], strict=True):
            lines.append(
                f"| {size:g} px | {u['cells']} | {u['perplexity']:.1f} | {u['dead']} | "
                f"{u['objective_init']:.4g} -> {u['objective']:.4g} |"
            )
        lines.append("")
    if "teacher" in prep:
        t = prep["teacher"]
        kw = ", ".join(f"{k}={v}" for k, v in t["model_kwargs"].items())
        lines += [
            f"Teacher: timm `{t['timm_model']}` built with {kw}, weights from `{t['arm']}` "
            f"pre-trained on these images for {t['device_minutes']:.2f} device-minutes "
            f"({t['steps']} steps, seed {t['seed']}) and exported by `python -m lmim.export`. "
            "Its forward runs in every step of the teacher arm and is in that arm's device "
            "time; its own pre-training is not.",
            "",
        ]
        if t.get("eval"):
            lines += [
                "| teacher's own level | " + " | ".join(EVAL_NAMES[k] for k in EVAL_KEYS) + " |",
                "|---|" + "---|" * len(EVAL_KEYS),
                f"| {t['arm']}, seed {t['seed']} | "
                + " | ".join(f"{t['eval'][k]:.1f}" for k in EVAL_KEYS)
                + " |",
                "",
            ]
    return lines


def write_markdown(args, res: dict, path: Path, command: str) -> None:
    pts = [f"{m:g}" for m in res["points"]]
    arms = [a for a in args.arms if res["equal_time"].get(a)]
    title = (
        "# LocalMIM's targets for equal device time on Fashion-MNIST (CPU)"
        if args.targets
        else "# LocalMIM vs MAE for equal device time on Fashion-MNIST (CPU)"
    )
    lines = [
        title,
        "",
        f"Command: `{command}`",
        "",
        f"Budget {args.minutes:g} device-minutes per run (device = this machine, "
        f"{torch.get_num_threads()} threads), seeds {', '.join(map(str, args.seeds))}; "
        f"evaluation on {args.eval_train} train / {args.eval_test} test images. "
        "Cells: mean over seeds (min–max). Accuracies in %.",
        "",
        "## Speed",
        "",
        "Each run's cosine is set to end at "
        f"{args.margin:g} x the budget from the calibrated step time; the last point is where "
        "training ended (the budget, or the cosine's last step if that came first).",
        "",
        "| arm | s/step (calibrated) | steps at each point | device-minutes at the last point |",
        "|---|---|---|---|",
    ]
    for a in arms:
        table = res["equal_time"][a]
        steps = " / ".join(f"{v['steps']['mean']:.0f}" for v in table.values())
        last = table[max(table, key=float)]
        lines.append(
            f"| {a} | {res['calibration_s_per_step'][a]:.3f} | {steps} | "
            f"{fmt(last['device_minutes'], 2)} |"
        )
    lines += target_inputs_markdown(res.get("targets") or {})
    for k in EVAL_KEYS:
        lines += ["", f"## Equal time: {EVAL_NAMES[k]}", ""]
        lines += [
            "| arm | " + " | ".join(f"{p} min" for p in pts) + " |",
            "|---|" + "---|" * len(pts),
        ]
        for a in arms:
            row = [fmt(res["equal_time"][a].get(p, {}).get(k)) for p in pts]
            lines.append(f"| {a} | " + " | ".join(row) + " |")
        raw = res["raw_pixels"]["knn" if k.startswith("knn") else "linear"]
        lines.append(f"| random init (step 0) | {fmt(res['init'][k])} |" + " |" * (len(pts) - 1))
        lines.append(f"| raw pixels | {raw:.1f} |" + " |" * (len(pts) - 1))
    if res["crossing"]:
        lines += [
            "",
            "## Device-minutes LocalMIM needed to reach each MAE arm's final accuracy",
            "",
            "(linear interpolation between evaluated points of the mean curve; – = not within "
            "the budget)",
            "",
            "| comparison | MAE final | LocalMIM device-minutes |",
            "|---|---|---|",
        ]
    for name, c in res["crossing"].items():
        m = "–" if c["minutes"] is None else f"{c['minutes']:.2f}"
        m = "0 (the initialisation)" if c["minutes"] == 0 else m
        lines.append(f"| {name} | {c['mae_final']:.1f} | {m} |")
    eq = res["equal_steps"]
    if len(eq) > 1:
        lines += [
            "",
            f"## Equal steps ({fmt(stats(eq['steps']), 0)} steps, each with its own cosine)",
            "",
            "| arm | " + " | ".join(EVAL_NAMES[k] for k in EVAL_KEYS) + " |",
            "|---|" + "---|" * len(EVAL_KEYS),
        ]
        for a, v in eq.items():
            if a != "steps":
                lines.append(f"| {a} | " + " | ".join(fmt(v[k]) for k in EVAL_KEYS) + " |")
    if res["finetune"]:
        lines += [
            "",
            f"## Short fine-tune ({args.finetune_epochs} epochs on "
            f"{args.finetune_images} images, recipe=small with "
            f"{' '.join(args.finetune_override) or 'nothing changed'}; test top-1 on "
            f"{args.finetune_test})",
            "",
            "| encoder | top-1 |",
            "|---|---|",
        ]
        for a, v in res["finetune"].items():
            lines.append(f"| {a} | {fmt(v)} |")
    if res.get("analysis"):
        n = len(next(iter(res["analysis"].values()))["nmi"])
        lines += [
            "",
            f"## Attention per block ({args.analysis_images} test images; "
            "`python -m lmim.analyze`, figures in `analysis/`)",
        ]
        for key, name in (("nmi", "NMI (query; key)"), ("distance", "attention distance (px)")):
            lines += [
                "",
                f"{name}, final encoders and the shared initial weights:",
                "",
                "| encoder | " + " | ".join(f"block {i + 1}" for i in range(n)) + " |",
                "|---|" + "---|" * n,
            ]
            digits = 3 if key == "nmi" else 1
            for label, v in res["analysis"].items():
                row = [fmt(s, digits) for s in v[key]]
                lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Loss and k-NN against device-hours: `report/budget.png` (`python -m lmim.report`).",
        "",
    ]
    path.write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=5.0, help="device-minutes per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="instead of --arms: localmim-sized with each of these targets "
        f"({', '.join(TARGETS)}; space- or comma-separated)",
    )
    p.add_argument("--codebook-codes", type=int, default=512, help="codes per scale")
    p.add_argument("--codebook-images", type=int, default=4096, help="views the codebook sees")
    p.add_argument(
        "--teacher-minutes",
        type=float,
        default=None,
        help="device-minutes of the teacher's pre-training (default: --minutes)",
    )
    p.add_argument("--teacher-seed", type=int, default=100)
    p.add_argument(
        "--equal-steps-arms",
        nargs="*",
        default=["mae-sized"],
        choices=list(ARMS),
        help="arms also trained for the steps localmim-sized made in the budget",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=40,
        help="lr warm-up steps (at most a fifth of a run's steps)",
    )
    p.add_argument("--calibration-steps", type=int, default=5)
    p.add_argument(
        "--margin",
        type=float,
        default=0.97,
        help="cosine length = margin x budget / calibrated step time",
    )
    p.add_argument(
        "--eval-points",
        choices=["all", "last"],
        default="all",
        help="evaluate every budget point, or only the last one (and the initialisation)",
    )
    p.add_argument("--eval-train", type=int, default=10_000, help="k-NN / probe train images")
    p.add_argument("--eval-test", type=int, default=5_000, help="k-NN / probe test images")
    p.add_argument(
        "--eval-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="extract evaluation features under bf16 autocast",
    )
    p.add_argument(
        "--finetune-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds whose final encoders are fine-tuned (default: the first)",
    )
    p.add_argument(
        "--finetune-override",
        nargs="*",
        default=["finetune.mixup=null", "finetune.auto_augment=null", "finetune.re_prob=0"],
        help="lmim.finetune overrides on top of recipe=small (default: without Mixup/CutMix, "
        "RandAugment and random erasing, which keep a 2-epoch fine-tune near chance)",
    )
    p.add_argument(
        "--analyze",
        action="store_true",
        help="also run python -m lmim.analyze on each seed's final encoders and initial weights "
        "(NMI and attention distance per layer, attention maps)",
    )
    p.add_argument("--analysis-images", type=int, default=256, help="test images analysed")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-images", type=int, default=5_000)
    p.add_argument("--finetune-test", type=int, default=2_000)
    p.add_argument("--finetune-batch", type=int, default=128)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST idx folder (default: apt's)")
    p.add_argument("--out", default="outputs/budget")
    p.add_argument("override", nargs="*", help="extra lmim.train overrides for every run")
    args = p.parse_args(argv)
    if args.targets:
        args.targets = [t for item in args.targets for t in item.split(",") if t]
        bad = [t for t in args.targets if t not in TARGETS]
        if bad:
            p.error(f"--targets: {', '.join(bad)} not among {', '.join(TARGETS)}")
        args.arms = [f"localmim-sized-{t}" for t in args.targets]
    if args.teacher_minutes is None:
        args.teacher_minutes = args.minutes
    if "localmim-sized" not in args.arms:
        args.equal_steps_arms = []
    if args.finetune_seeds is None:
        args.finetune_seeds = args.seeds[:1]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    find_root(args.data_root)  # a clear error naming `make fashion-mnist` when absent
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.data_root:
        args.override.append(f"data.root={args.data_root}")
    args.override.append(f"data.img_size={args.img_size}")
    t_start = time.perf_counter()

    calib_path = out / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else {}
    if any(arm not in calib for arm in args.arms):
        # A first calibration in a fresh process runs ~10% slow (allocator and thread-pool
        # warm-up), which would shorten the first arm's cosine: one is made and discarded.
        calibrate(args, args.arms[0] if not args.targets else "localmim-sized")
    prep = prepare_targets(args, out, calib, calib_path) if args.targets else {}
    for arm in args.arms:
        if arm not in calib:
            calib[arm] = calibrate(args, arm)
            log(f"{arm}: {calib[arm]:.3f} s/step")
            calib_path.write_text(json.dumps(calib, indent=1))

    minutes = [f * args.minutes for f in FRACTIONS]
    points_by_run: dict[tuple[str, int], dict] = {}
    for seed in args.seeds:
        for arm in args.arms:
            steps = max(1, math.floor(args.margin * 60 * args.minutes / calib[arm]))
            points_by_run[arm, seed] = run_train(
                train_overrides(args, arm, seed, steps, minutes, True),
                out / "equal_time" / f"{arm}-s{seed}",
            )
    steps_eq: list[int] = []
    eq_points: dict[tuple[str, int], dict] = {}
    for seed in args.seeds if args.equal_steps_arms else []:
        n = points_by_run["localmim-sized", seed]["end"]["step"]
        steps_eq.append(n)
        for arm in args.equal_steps_arms:
            eq_points[arm, seed] = run_train(
                train_overrides(args, arm, seed, n, [1e6], False),
                out / "equal_steps" / f"{arm}-s{seed}",
            )

    log("evaluating checkpoints")
    data = EvalData(args)
    cache: dict = {}
    equal_time = {arm: {} for arm in args.arms}
    init_rows = {}
    for (arm, seed), pts in points_by_run.items():
        rows = evaluate_run(
            out / "equal_time" / f"{arm}-s{seed}", pts, data, cache, args.eval_points == "last"
        )
        equal_time[arm][seed] = rows
        init_rows.setdefault(seed, rows[0])
    init = {k: stats([r[f"eval/{k}_top1"] for r in init_rows.values()]) for k in EVAL_KEYS}
    equal_steps = {}
    for arm in ["localmim-sized", *args.equal_steps_arms] if steps_eq else []:
        rows = []
        for seed in args.seeds:
            if arm == "localmim-sized":
                rows.append(equal_time[arm][seed][-1])
            else:
                pts = {k: v for k, v in eq_points[arm, seed].items() if k == "end"}
                rows += evaluate_run(out / "equal_steps" / f"{arm}-s{seed}", pts, data, cache)
        equal_steps[arm] = {k: stats([r[f"eval/{k}_top1"] for r in rows]) for k in EVAL_KEYS}
    raw = raw_pixel_levels(data)
    log(f"raw pixels: {_fmt_row(raw)}")
    if "teacher" in prep:  # the teacher's own level, evaluated like the arms
        teacher = prep["teacher"]
        rows = evaluate_run(Path(teacher["run_dir"]), teacher.pop("points"), data, cache, True)
        teacher["eval"] = {k: rows[-1][f"eval/{k}_top1"] for k in EVAL_KEYS}

    finetunes: dict = {}
    if args.finetune_epochs > 0:
        for arm in args.arms:
            tops = [
                run_finetune(
                    args,
                    out / "finetune" / f"{arm}-s{seed}",
                    [f"checkpoint={points_by_run[arm, seed]['end']['path']}", f"seed={seed}"],
                )
                for seed in args.finetune_seeds
            ]
            finetunes[arm] = stats(tops)
        # from scratch: the same fine-tune from the seed's initial weights (budget_start.ckpt)
        finetunes["from scratch"] = stats(
            [
                run_finetune(
                    args,
                    out / "finetune" / f"scratch-s{seed}",
                    [
                        f"checkpoint={points_by_run[args.arms[0], seed]['start']['path']}",
                        f"seed={seed}",
                    ],
                )
                for seed in args.finetune_seeds
            ]
        )

    res = summarise(args, calib, equal_time, equal_steps, init, raw, finetunes, steps_eq)
    res["targets"] = prep
    if args.analyze:
        records = [run_analysis(args, out, points_by_run, seed) for seed in args.seeds]
        res["analysis"] = summarise_analysis(records)
        plot_analysis(res["analysis"], "nmi", "NMI (query; key)", out / "analysis" / "nmi.png")
        plot_analysis(
            res["analysis"],
            "distance",
            "mean attention distance (px)",
            out / "analysis" / "attention_distance.png",
        )
    res["wall_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(args, res, out / "results.md", command)
    from lmim.report import report

    report([str(out / "equal_time")], out / "report", acc_key="eval/knn_last_top1")
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'report'}")
    print((out / "results.md").read_text())
    return res


if __name__ == "__main__":
    main()
