"""Fit per-scale codebooks for ``target=codebook`` by mini-batch k-means on your training images.

::

    python -m lmim.codebook data.root=/data/imagenet target.base=hog target.codes=512 \
        out=codebook.pt
    python -m lmim.train target=codebook target.path=codebook.pt data.root=/data/imagenet

The cells are those of the run's taps (``model=`` and ``schedule=`` as in training: cell =
mask unit / scale). The base descriptor (``target.base``: hog, hog18, pixel) is computed on
training views (the data group's augmentation), ``cells_per_image`` random cells per image and
scale are kept, up to ``max_cells``, and each scale's codes are fitted by mini-batch k-means
(Sculley 2010: per-code learning rates 1 / count) on the device, initialised from random cells;
codes left without cells are re-seeded from random cells. The file holds the codes, the base
descriptor's state (HOG's frozen bias) and the usage: perplexity of the code distribution and
dead codes, printed at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lmim.cli import hydra_entry
from lmim.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch and the targets are imported by the functions that use them: Hydra composes (and
# answers --help or a mistyped key) before either is loaded.


def objective(cells: torch.Tensor, codes: torch.Tensor, chunk: int = 65536) -> float:
    """Mean squared distance of the cells to their nearest code."""
    from lmim.targets.codebook import assign

    total = 0.0
    for i in range(0, cells.shape[0], chunk):
        part = cells[i : i + chunk]
        nearest = codes[assign(part, codes)]
        total += float((part - nearest).pow(2).sum())
    return total / max(cells.shape[0], 1)


def kmeans(
    cells: torch.Tensor,
    codes: int,
    iters: int = 100,
    batch: int = 4096,
    seed: int = 0,
    progress=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mini-batch k-means of ``cells`` (M, D) into ``codes`` centres.

    Returns:
        The (codes, D) centres and ``{"objective_init", "objective"}`` (mean squared distance
        to the nearest centre before and after).
    """
    import torch

    from lmim.targets.codebook import assign

    g = torch.Generator(device="cpu").manual_seed(seed)
    m = cells.shape[0]
    if m < codes:
        raise ConfigError(
            f"only {m} cells for target.codes={codes}: give more images (images=) or fewer codes"
        )
    centres = cells[torch.randperm(m, generator=g)[:codes].to(cells.device)].clone()
    counts = torch.zeros(codes, device=cells.device)
    start = objective(cells, centres)
    for _ in range(iters):
        pick = torch.randint(0, m, (min(batch, m),), generator=g).to(cells.device)
        x = cells[pick]
        idx = assign(x, centres)
        hits = torch.bincount(idx, minlength=codes).float()
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        counts += hits
        rate = (hits / counts.clamp_min(1)).unsqueeze(1)
        mean = sums / hits.clamp_min(1).unsqueeze(1)
        centres = torch.where(hits.unsqueeze(1) > 0, centres + rate * (mean - centres), centres)
        dead = counts == 0
        if dead.any():  # re-seed unused centres from random cells
            fresh = torch.randint(0, m, (int(dead.sum()),), generator=g).to(cells.device)
            centres[dead] = cells[fresh]
        if progress is not None:
            progress.update(1)
    return centres, {"objective_init": start, "objective": objective(cells, centres)}


def collect(cfg: DictConfig, base_name: str, device: torch.device) -> tuple[Any, list, list]:
    """The base descriptor at the run's cell sizes, those sizes, and sampled cells per scale."""
    import torch

    from lmim.targets.codebook import make_base
    from lmim.utils import instantiate_checked

    # The run's cell sizes: the model as the run builds it, with a base target in place.
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["target"] = {"_target_": "lmim.targets.HOG", "_partial_": True}
    net = instantiate_checked(OmegaConf.create(model_cfg))
    cell_sizes = list(net.cell_sizes)
    del net
    base = make_base(base_name, cell_sizes).to(device)
    dm = instantiate_checked(cfg.data)
    dm.validate()
    dm.setup("fit")
    loader = dm.train_dataloader()
    want = int(cfg.images)
    per = int(cfg.cells_per_image)
    g = torch.Generator().manual_seed(int(cfg.seed))
    cells: list[list[torch.Tensor]] = [[] for _ in cell_sizes]
    seen = 0
    from tqdm import tqdm

    with tqdm(total=want, desc="cells from images", unit="img") as bar:
        for images, _ in loader:
            images = dm.normalize(images.to(device))
            feats = base(images)
            for k, f in enumerate(feats):
                n = f.shape[1]
                pick = torch.randint(0, n, (f.shape[0], min(per, n)), generator=g).to(device)
                cells[k].append(torch.gather(f, 1, pick[..., None].expand(-1, -1, f.shape[2])))
            seen += images.shape[0]
            bar.update(images.shape[0])
            if seen >= want:
                break
    limit = int(cfg.max_cells)
    out = [torch.cat([c.flatten(0, 1) for c in per_scale])[:limit] for per_scale in cells]
    return base, cell_sizes, out


def fit(cfg: DictConfig) -> dict[str, Any]:
    """Fit and save the codebooks of ``cfg``; returns the summary."""
    import torch
    from hydra.utils import to_absolute_path
    from tqdm import tqdm

    from lmim.targets.codebook import BASES, FORMAT, assign, usage

    base_name = str(cfg.target.base)
    if base_name not in BASES:
        raise ConfigError(
            f"target.base={base_name!r} is not one of {', '.join(BASES)} (the descriptor the "
            "codebook quantises)"
        )
    codes = int(cfg.target.codes)
    if codes < 2:
        raise ConfigError(f"target.codes={codes} must be >= 2")
    if cfg.out in (None, "", "???"):
        raise ConfigError("out is not set: pass out=codebook.pt (the file to write)")
    out = Path(to_absolute_path(str(cfg.out)))
    if out.exists():
        raise ConfigError(f"out={cfg.out} already exists: choose another file or remove it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, cell_sizes, cells = collect(cfg, base_name, device)
    books, stats = [], []
    with tqdm(total=int(cfg.iters) * len(cells), desc="k-means", unit="step") as bar:
        for k, c in enumerate(cells):
            centres, obj = kmeans(c, codes, int(cfg.iters), int(cfg.batch), int(cfg.seed) + k, bar)
            perplexity, dead = usage(assign(c, centres), codes)
            books.append(centres.cpu())
            stats.append(
                {
                    "cells": int(c.shape[0]),
                    "perplexity": float(perplexity),
                    "dead": int(dead),
                    **obj,
                }
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "base": base_name,
            "cell_sizes": [float(s) for s in cell_sizes],
            "codes": books,
            "base_state": {k: v.cpu() for k, v in base.state_dict().items()},
            "usage": stats,
        },
        out,
    )
    return {"out": str(out), "cell_sizes": cell_sizes, "codes": codes, "usage": stats}


@hydra_entry("codebook")
def main(cfg: DictConfig) -> None:
    from lmim.cli import fail

    try:
        summary = fit(cfg)
    except ConfigError as err:
        fail(str(err))
    for size, s in zip(summary["cell_sizes"], summary["usage"], strict=True):
        drop = 100 * (1 - s["objective"] / max(s["objective_init"], 1e-12))
        print(
            f"{float(size):g}-px cells: {s['cells']} cells, perplexity {s['perplexity']:.1f} of "
            f"{summary['codes']} codes, {s['dead']} dead, k-means objective "
            f"{s['objective_init']:.4g} -> {s['objective']:.4g} (-{drop:.0f}%)"
        )
    print(f"codebook: {summary['out']}")
    print(f"train with: python -m lmim.train target=codebook target.path={summary['out']}")


if __name__ == "__main__":
    main()
