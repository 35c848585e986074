"""Training-loader throughput on real JPEGs at ImageNet sizes, per CPU core, for each path.

Makes (once) a corpus of ImageNet-sized JPEGs from scikit-image's bundled photos: random crops,
short side 375-500, quality 90, in 10 class folders. Then, in this process on one thread, times
each path's training views (the real ``TrainSet`` code: seeding, bad-image handling, the
sampler's order), taking turns so that load from elsewhere hits them alike:

- ``decode``: PIL's full-size decode to RGB alone, the yardstick that machines are compared by;
- ``pil``: the reference pipeline (PIL decode + torchvision RandomResizedCrop, flip, ToTensor,
  Normalize), what ``data=imagefolder`` did before ``data.pipeline=fast``;
- ``fast``: ``data=imagefolder`` today (crop before decode, uint8; the device normalises);
- ``shards``: ``data=shards`` with the fast pipeline, from LitData shards of the same files;
- ``dali``: ``data=imagefolder_dali`` with DALI's CPU operators on one thread (the workers'
  part, reading and drawing crops, included); on a machine with a GPU also per GPU, DALI
  decoding the crop regions on the device (``mixed``), from batches the workers prepared.

It also times the loaders with one worker process (collation and the copy between processes
included), measures how far the fast views are from the reference ones (``--compare``), and
runs a real short CPU fit of ViT-B at batch 8 on the corpus to read its data-wait share
(``perf/data_wait_frac``). Writes ``results.json`` and ``results.md`` to ``--out``::

    python benchmarks/loader.py                       # all of it, about 10 minutes on 2 cores
    python benchmarks/loader.py --skip-fit --images 1000
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmim.data.datamodules import DEMO_IMAGES

ROOT = Path(__file__).resolve().parents[1]
# The demo photos and two more bundled ones.
PHOTOS = (*DEMO_IMAGES, "page", "cat")


def make_corpus(folder: Path, count: int, seed: int = 0) -> Path:
    """``folder/train/c<k>/<i>.JPEG``: ``count`` ImageNet-sized JPEGs (short side 375-500,
    aspect 2:3 to 3:2, q90) cut from the bundled photos at random places and scales."""
    from lmim.data import load_demo_images

    split = folder / "train"
    done = split / ".complete"
    if done.is_file() and int(done.read_text()) == count:
        return folder
    photos = load_demo_images(PHOTOS)
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        W, H = photo.size
        short = int(rng.integers(375, 501))
        aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3]))
        w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
        fit = min(W / w, H / h) * rng.uniform(0.5, 1.0)
        cw, ch = max(8, int(w * fit)), max(8, int(h * fit))
        x, y = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        out = split / f"c{i % 10}"
        out.mkdir(parents=True, exist_ok=True)
        img.save(out / f"{i:05d}.JPEG", quality=90)
    done.write_text(str(count))
    return folder


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def datamodule(kind: str, corpus: Path, shards: Path, img_size: int, workers: int = 0):
    """The training DataModule of a path (``pil``, ``fast``, ``dali``: the folder; ``shards``)."""
    from lmim.data import ImageFolderDataModule, ShardsDataModule

    common = dict(img_size=img_size, batch_size=64, num_workers=workers, seed=0)
    if kind == "shards":
        dm = ShardsDataModule(path=str(shards), **common)
    else:
        dm = ImageFolderDataModule(root=str(corpus), pipeline=kind, **common)
    dm.setup("fit")
    return dm


def per_core(corpus: Path, shards: Path, n: int, img_size: int, rounds: int) -> dict:
    """Images/s of each path on one thread, the paths taking turns in rounds of ``n // rounds``
    images; the median of the rounds' rates."""
    from lmim.data.images import load_rgb

    dms = {k: datamodule(k, corpus, shards, img_size) for k in ("pil", "fast", "shards")}
    files = [p for p, _ in dms["pil"].train_set.source.samples]
    orders = {k: list(dm.make_sampler(1, 0, 0)) for k, dm in dms.items()}
    per_round = max(1, n // rounds)
    rates: dict[str, list[float]] = {k: [] for k in ("decode", *dms)}
    for r in range(rounds):
        chunk = slice(r * per_round, (r + 1) * per_round)
        t = time.perf_counter()
        for key in orders["pil"][chunk]:
            load_rgb(files[key.index])
        rates["decode"].append(per_round / (time.perf_counter() - t))
        for k, dm in dms.items():
            t = time.perf_counter()
            for key in orders[k][chunk]:
                dm.train_set[key]
            rates[k].append(per_round / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def dali_rates(corpus: Path, n: int, img_size: int, batch: int = 64) -> dict:
    """Images/s of the dali pipeline: on one CPU thread (workers' part + DALI CPU decode), and
    per GPU (DALI on the device, batches prepared beforehand) when CUDA is available."""
    from lmim.data.dali import DaliDecoder, collate_encoded

    dm = datamodule("dali", corpus, corpus, img_size)
    keys = list(dm.make_sampler(1, 0, 0))[:n]
    batches = [keys[i : i + batch] for i in range(0, len(keys) - batch + 1, batch)]
    cpu = DaliDecoder(img_size, batch, torch.device("cpu"), threads=1)
    cpu(collate_encoded([dm.train_set[k] for k in batches[0]])[0])  # build
    t = time.perf_counter()
    for b in batches:
        cpu(collate_encoded([dm.train_set[k] for k in b])[0])
    out = {"cpu": len(batches) * batch / (time.perf_counter() - t), "cpu_fallbacks": cpu.fallbacks}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        gpu = DaliDecoder(img_size, batch, device, threads=4)
        prepared = [collate_encoded([dm.train_set[k] for k in b])[0] for b in batches]
        gpu(prepared[0])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            for b in prepared:
                gpu(b)
        torch.cuda.synchronize()
        out["gpu"] = 3 * len(prepared) * batch / (time.perf_counter() - t)
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["gpu_fallbacks"] = gpu.fallbacks
    return out


def with_worker(corpus: Path, shards: Path, n: int, img_size: int) -> dict:
    """Images/s of each path's real loader with one worker process (batches of 64)."""
    out = {}
    for k in ("pil", "fast", "shards"):
        loader = iter(datamodule(k, corpus, shards, img_size, workers=1).train_dataloader())
        next(loader)  # worker start-up
        t, images = time.perf_counter(), 0
        for batch in loader:  # the rest of the epoch, at most n images
            images += batch[0].shape[0]
            if images >= n:
                break
        out[k] = images / (time.perf_counter() - t)
        del loader
    return out


def compare(corpus: Path, n: int, img_size: int) -> dict:
    """RMS and max difference (8-bit levels) of fast views to the reference views of the same
    samples, and the share decoded at reduced scale."""
    from lmim.data.decode import normalize_uint8
    from lmim.data.resumable import SampleKey
    from lmim.seeding import AUGMENT, derive_seed

    fast = datamodule("fast", corpus, corpus, img_size)
    ref = datamodule("pil", corpus, corpus, img_size)
    std = torch.tensor(ref.std).view(-1, 1, 1)
    tf = fast.train_set.transform
    step = max(1, len(fast.train_set) // n)
    sq, count, worst, drafted = 0.0, 0, 0.0, 0
    sq_full = []
    for i in range(0, len(fast.train_set), step)[:n]:
        a = normalize_uint8(fast.train_set[SampleKey(i, 0)][0][None], ref.mean, ref.std)[0]
        b = ref.train_set[SampleKey(i, 0)][0]
        d = ((a - b) * std * 255).double()
        sq += float(d.pow(2).mean())
        count += 1
        worst = max(worst, float(d.abs().max()))
        path = fast.train_set.source.samples[i][0]
        with Image.open(path) as im:
            W, H = im.size
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(0, AUGMENT, 0, i))
            _, _, h, w, _ = tf.params(W, H)
        k = tf.draft_factor(h, w)
        drafted += k > 1
        if k == 1:
            sq_full.append(float(d.pow(2).mean()))
    dali_rms = None
    with contextlib.suppress(ImportError):
        from lmim.data.dali import DaliDecoder, collate_encoded

        dali = datamodule("dali", corpus, corpus, img_size)
        keys = [SampleKey(i, 0) for i in range(0, len(dali.train_set), step)[:n]]
        dec = DaliDecoder(img_size, 32, torch.device("cpu"))
        dsq = 0.0
        for j in range(0, len(keys), 32):
            views, _ = dec(collate_encoded([dali.train_set[k] for k in keys[j : j + 32]])[0])
            for v, k in zip(views, keys[j : j + 32], strict=True):
                a = normalize_uint8(v[None], ref.mean, ref.std)[0]
                dsq += float(((a - ref.train_set[k][0]) * std * 255).double().pow(2).mean())
        dali_rms = math.sqrt(dsq / len(keys))
    rms = math.sqrt(sq / count)
    return {
        "dali_rms_levels": dali_rms,
        "img_size": img_size,
        "images": count,
        "rms_levels": rms,
        "psnr_db": 20 * math.log10(255 / max(rms, 1e-9)),
        "max_levels": worst,
        "reduced_scale_share": drafted / count,
        "rms_levels_full_scale_only": math.sqrt(sum(sq_full) / max(len(sq_full), 1)),
    }


def short_fit(corpus: Path, out: Path, steps: int) -> dict:
    """A real ``python -m lmim.train`` of ViT-B at batch 8 on the corpus (fast pipeline, one
    worker on this machine's cores); its data-wait share and step time from metrics.csv."""
    run = out / "fit"
    cmd = [
        sys.executable,
        "-m",
        "lmim.train",
        "model=vit_b",
        "target=hog",
        "data=imagefolder",
        f"data.root={corpus}",
        "data.batch_size=8",
        "trainer=cpu",
        "logger=csv",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
    ]
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    waits = [float(r["perf/data_wait_frac"]) for r in rows if r.get("perf/data_wait_frac")]
    return {
        "steps": steps,
        "wall_s": time.perf_counter() - t,
        "data_wait_frac_last": waits[-1] if waits else None,
        "data_wait_frac_median": statistics.median(waits) if waits else None,
        "windows": len(waits),
    }


def table(res: dict) -> str:
    rate = res["per_core"]
    dec = rate["decode"]
    lines = [
        f"Loader throughput, images/s on one thread ({res['cpu']}, {res['cpus']} CPUs; "
        f"{res['images']} ImageNet-sized JPEGs, views of {res['img_size']} px)",
        "",
        "| path | images/s per core | x full-size PIL decode | with 1 worker process |",
        "|---|---|---|---|",
        f"| PIL full-size decode alone | {dec:.0f} | 1.00 | |",
    ]
    names = {
        "pil": "pipeline=pil (before)",
        "fast": "pipeline=fast (default)",
        "shards": "data=shards (fast)",
    }
    for k, name in names.items():
        w = res.get("with_worker", {}).get(k)
        lines.append(
            f"| {name} | {rate[k]:.0f} | {rate[k] / dec:.2f} | {'' if w is None else f'{w:.0f}'} |"
        )
    d = res.get("dali")
    if d:
        lines.append(
            f"| pipeline=dali, DALI CPU operators | {d['cpu']:.0f} | {d['cpu'] / dec:.2f} | |"
        )
        gpu = f"{d['gpu']:.0f} images/s on {d['gpu_name']}" if "gpu" in d else "not measured"
        lines += ["", f"pipeline=dali per GPU (DALI on the device, batches of 64): {gpu}"]
    for c in res.get("compare", []):
        dali_rms = c.get("dali_rms_levels")
        if dali_rms is not None:
            lines += ["", f"dali vs pil at {c['img_size']} px: RMS {dali_rms:.2f} levels"]
        lines += [
            "",
            f"fast vs pil at {c['img_size']} px over {c['images']} views: RMS "
            f"{c['rms_levels']:.2f} levels ({c['psnr_db']:.1f} dB), max {c['max_levels']:.0f}; "
            f"{100 * c['reduced_scale_share']:.1f}% decoded at reduced scale; full-scale views "
            f"alone {c['rms_levels_full_scale_only']:.2f} levels RMS",
        ]
    fit = res.get("fit")
    if fit:
        lines += [
            "",
            f"Real CPU fit, ViT-B batch 8, {fit['steps']} steps: perf/data_wait_frac median "
            f"{fit['data_wait_frac_median']:.4f} (last {fit['data_wait_frac_last']:.4f}) over "
            f"{fit['windows']} logging windows",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "loader")
    p.add_argument("--images", type=int, default=2000, help="JPEGs in the corpus")
    p.add_argument("--measure", type=int, default=2000, help="views timed per path")
    p.add_argument("--rounds", type=int, default=8, help="turns the paths take")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--compare", type=int, default=400, help="views compared (0: skip)")
    p.add_argument("--fit-steps", type=int, default=30)
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-worker", action="store_true")
    args = p.parse_args()
    args.out = args.out.resolve()  # the short fit runs in it and reads the corpus by path
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args.out / "corpus", args.images)
    shards = args.out / "shards"
    if not (shards / "index.json").is_file():
        from lmim.data.shards import write_shards

        if shards.exists():
            import shutil

            shutil.rmtree(shards)
        t = time.perf_counter()
        write_shards(str(corpus), str(shards))
        log(f"wrote shards in {time.perf_counter() - t:.1f} s")
    res: dict = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "images": args.images,
        "img_size": args.img_size,
    }
    with contextlib.suppress(OSError, IndexError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        res["cpu"] = [x for x in lines if x.startswith("model name")][0].split(":", 1)[1].strip()
    log("per-core rates ...")
    res["per_core"] = per_core(corpus, shards, args.measure, args.img_size, args.rounds)
    if not args.skip_worker:
        log("loaders with one worker ...")
        res["with_worker"] = with_worker(corpus, shards, args.measure, args.img_size)
    with contextlib.suppress(ImportError):
        import nvidia.dali  # noqa: F401

        log("dali ...")
        res["dali"] = dali_rates(corpus, min(args.measure, 1024), args.img_size)
    if args.compare:
        log("pixel difference fast vs pil ...")
        res["compare"] = [
            compare(corpus, args.compare, s) for s in sorted({args.img_size, args.img_size // 2})
        ]
    if not args.skip_fit:
        log("short ViT-B fit ...")
        res["fit"] = short_fit(corpus, args.out, args.fit_steps)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (args.out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
