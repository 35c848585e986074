"""Pictures a person can read: HOG glyphs, pixel reconstructions, and how well masked cells are
predicted.

Library code leaves matplotlib's global state alone (no backend switch, no pyplot): figures are
plain :class:`matplotlib.figure.Figure` objects, saved with ``fig.savefig(path)`` and shown by
Jupyter as the value of a cell (or ``display(fig)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from lmim.targets.pixel import patchify, unpatchify

# Background of masked cells in HOG panels (the cells the loss scores).
MASKED_RGB = np.array([0.0, 0.1, 0.32])
# Brightness of the strokes of visible (unscored) cells.
CONTEXT_DIM = 0.45


# -- how well masked cells are predicted -------------------------------------------------------


@dataclass(frozen=True)
class CellScores:
    """How well one tap predicts its masked cells, weighted like the loss.

    Attributes:
        r2: ``1 - SSE(pred) / SSE(mean target)``: the share of the targets' variation over the
            masked cells that the predictions explain. 0 = no better than predicting the tap's
            mean target in every cell (what an untrained or collapsed decoder learns first); 1 =
            perfect.
        corr: mean over masked cells of the Pearson correlation between a cell's predicted and
            target vectors (cells whose target or prediction is constant are left out).
        corr_mean: the same for the mean target as the prediction of every cell: what ``corr``
            must beat.
        cells: sum of the cells' loss weights (fully masked cells count 1).
    """

    r2: float
    corr: float
    corr_mean: float
    cells: float


def _cell_correlation(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    ok = den > 1e-8
    if not bool(ok.any()):
        return float("nan")
    r = (a * b).sum(dim=1)[ok] / den[ok]
    return float((r * w[ok]).sum() / w[ok].sum())


def masked_cell_scores(
    preds: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
) -> list[CellScores]:
    """Per tap, how much better than the mean target the predictions of masked cells are.

    Args:
        preds, targets: per tap (B, N_k, D_k) predictions and targets.
        weights: per tap (B, N_k) loss weights of the cells (1 = masked, 0 = visible,
            fractions for coarse cells that are partly visible).

    Returns:
        One :class:`CellScores` per tap, computed over every masked cell of the batch with the
        cells' loss weights; the mean target is the weighted mean over those cells.
    """
    scores = []
    for pred, target, weight in zip(preds, targets, weights, strict=True):
        w = weight.detach().float().reshape(-1)
        keep = w > 0
        p = pred.detach().float().reshape(w.numel(), -1)[keep]
        t = target.detach().float().reshape(w.numel(), -1)[keep]
        w = w[keep]
        if w.numel() == 0:
            scores.append(CellScores(float("nan"), float("nan"), float("nan"), 0.0))
            continue
        mean = (t * w[:, None]).sum(0, keepdim=True) / w.sum()
        sse = ((p - t).pow(2).sum(1) * w).sum()
        sst = ((mean - t).pow(2).sum(1) * w).sum()
        r2 = float(1 - sse / sst) if float(sst) > 0 else float("nan")
        scores.append(
            CellScores(
                r2=r2,
                corr=_cell_correlation(p, t, w),
                corr_mean=_cell_correlation(mean.expand_as(t), t, w),
                cells=float(w.sum()),
            )
        )
    return scores


def format_scores(tap_names: Sequence[str], scores: Sequence[CellScores]) -> str:
    """One line, e.g. ``masked-cell R² (0 = mean target): block1 0.08, block3 0.14``."""
    parts = ", ".join(f"{n} {s.r2:.2f}" for n, s in zip(tap_names, scores, strict=True))
    return f"masked-cell R² (0 = predicting the mean target): {parts}"


# -- HOG ---------------------------------------------------------------------------------------


def hog_glyphs(nbins: int, size: int) -> np.ndarray:
    """(nbins, size, size) line templates, one per orientation bin.

    The bins hold unsigned gradient orientations; an edge runs perpendicular to its gradient, so
    each glyph is a line through the cell centre at the bin-centre orientation + 90 degrees.
    With ``theta = atan2(g_lr, g_tb)`` a gradient along x (a vertical edge) has theta = pi/2,
    and its glyph is a vertical line.
    """
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - c
    half = max(1.0, size / 16)  # stroke half-width: strokes thicken with the cell, stay readable
    glyphs = np.zeros((nbins, size, size))
    for b in range(nbins):
        theta = (b + 0.5) * math.pi / nbins
        # gradient direction in (x, y) = (sin theta, cos theta); the edge is perpendicular to it
        gx, gy = math.sin(theta), math.cos(theta)
        dist = np.abs(xx * gx + yy * gy)  # distance from the edge line through the centre
        along = np.abs(-xx * gy + yy * gx)
        glyphs[b] = np.clip(half - dist, 0, 1) * (along <= c)
    return glyphs


def hog_cells(feats: torch.Tensor | np.ndarray, grid: tuple[int, int], nbins: int) -> np.ndarray:
    """(h * w, C * nbins) HOG features -> (h, w, nbins) bin values averaged over colours."""
    f = torch.as_tensor(feats).detach().float().cpu().numpy()
    h, w = grid
    return f.reshape(h, w, -1, nbins).clip(min=0).mean(axis=2)


def hog_picture(
    feats: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    nbins: int,
    cell_px: int = 12,
    vmax: float | None = None,
    floor: bool = False,
) -> np.ndarray:
    """Render HOG cells as oriented strokes (brighter = stronger), averaged over colours.

    Args:
        feats: (h * w, C * nbins) HOG features of one image, cells in raster order.
        grid: (h, w).
        nbins: orientation bins.
        cell_px: rendered side of one cell.
        vmax: the bin value drawn at full brightness; None = the picture's largest. Give a
            target and its prediction the same ``vmax`` to compare their strengths.
        floor: draw each bin's excess over the cell's weakest bin, i.e. the cell's oriented
            part: a flat histogram (edges of every orientation, or a prediction of the average
            histogram) is then a dark cell instead of an eight-pointed star.

    Returns:
        (h * cell_px, w * cell_px) float image in [0, 1].
    """
    f = hog_cells(feats, grid, nbins)
    if floor:
        f = f - f.min(axis=2, keepdims=True)
    h, w = grid
    # Max over bins, not sum: every glyph crosses the cell centre, and a sum would turn it into
    # a bright dot that hides the orientations.
    glyphs = hog_glyphs(nbins, cell_px)
    img = (f[:, :, :, None, None] * glyphs[None, None]).max(axis=2)  # (h, w, S, S)
    img = img.transpose(0, 2, 1, 3).reshape(h * cell_px, w * cell_px)
    top = float(img.max()) if vmax is None else float(vmax)
    return (img / top).clip(0, 1) if top > 0 else img


def oriented_scale(feats: Sequence[torch.Tensor], nbins: int, q: float = 99.0) -> float:
    """The bin excess drawn at full brightness by ``hog_picture(..., floor=True)`` for a set of
    pictures: the ``q``-th percentile over their cells of each cell's largest excess over its
    weakest bin (a robust maximum; 1.0 when every cell is flat).

    Args:
        feats: (N_i, C * nbins) HOG features of cells (whole pictures or any selection).
        nbins: orientation bins.
        q: percentile.
    """
    peaks = []
    for f in feats:
        cells = hog_cells(f, (f.shape[0], 1), nbins)[:, 0]  # (N, nbins)
        peaks.append((cells - cells.min(axis=1, keepdims=True)).max(axis=1))
    top = float(np.percentile(np.concatenate(peaks), q)) if peaks else 0.0
    return top if top > 1e-8 else 1.0


def cell_map(values: torch.Tensor | np.ndarray, grid: tuple[int, int], cell_px: int) -> np.ndarray:
    """(h * w,) per-cell values -> (h * cell_px, w * cell_px), each cell a constant square."""
    v = torch.as_tensor(values).detach().float().cpu().numpy().reshape(grid)
    return v.repeat(cell_px, axis=0).repeat(cell_px, axis=1)


def hog_panel(
    feats: torch.Tensor,
    grid: tuple[int, int],
    nbins: int,
    cell_px: int,
    vmax: float,
    weight: torch.Tensor,
    context: torch.Tensor | None = None,
    context_vmax: float | None = None,
) -> np.ndarray:
    """An RGB HOG picture of the cells' oriented parts (``floor=True``): masked cells bright on
    dark blue, visible cells dimmed on black.

    Args:
        feats: (h * w, D) features drawn in the masked cells (and, dimmed, in the visible ones
            unless ``context`` is given).
        grid, nbins, cell_px, vmax: as in :func:`hog_picture`.
        weight: (h * w,) loss weights; the blue is as strong as the weight.
        context: (h * w, D) features drawn (dimmed) in the visible cells instead: a prediction
            panel shows the target there, since the decoder is not scored on them.
        context_vmax: ``vmax`` of the context (default ``vmax``).

    Returns:
        (h * cell_px, w * cell_px, 3) float image in [0, 1].
    """
    strokes = hog_picture(feats, grid, nbins, cell_px, vmax, floor=True)
    if context is None:
        seen = strokes
    else:
        cv = vmax if context_vmax is None else context_vmax
        seen = hog_picture(context, grid, nbins, cell_px, cv, floor=True)
    w = cell_map(weight, grid, cell_px).clip(0, 1)
    strokes = np.where(w > 0, strokes, CONTEXT_DIM * seen)
    bg = w[..., None] * MASKED_RGB
    return (bg * (1 - strokes[..., None]) + strokes[..., None]).clip(0, 1)


def zoom_window(
    mask: torch.Tensor, patch_grid: tuple[int, int], target: np.ndarray, size: int = 2
) -> tuple[int, int]:
    """Top-left patch (row, col) of the ``size x size`` patch window to enlarge.

    Prefers windows that are mostly masked but keep a visible patch for context, then the most
    structured ones (largest mean strength of the dominant orientation in ``target``).

    Args:
        mask: (L,) bool patch mask, True = masked.
        patch_grid: (rows, cols) of patches.
        target: (h, w, nbins) bin values of the tap to enlarge (``h`` a multiple of rows).
        size: window side in patches.
    """
    rows, cols = patch_grid
    size = min(size, rows, cols)
    m = mask.reshape(rows, cols).float().cpu().numpy()
    s = target.shape[0] // rows
    structure = (target.max(axis=2) - target.mean(axis=2)).reshape(rows, s, cols, s)
    structure = structure.mean(axis=(1, 3))
    best, best_key = (0, 0), None
    full = size * size
    for r in range(rows - size + 1):
        for c in range(cols - size + 1):
            masked = int(m[r : r + size, c : c + size].sum())
            mixed = 0 < masked < full
            key = (mixed, masked, float(structure[r : r + size, c : c + size].mean()))
            if best_key is None or key > best_key:
                best, best_key = (r, c), key
    return best


# -- pixels ------------------------------------------------------------------------------------


def pixel_picture(feats: torch.Tensor, grid: tuple[int, int], cell: int) -> np.ndarray:
    """Per-cell pixel targets (B-less, (h * w, cell^2 * 3)) -> an (H, W, 3) image in [0, 1].

    Each cell is min-max stretched on its own, since normalised-pixel targets have no common scale.
    """
    x = torch.as_tensor(feats).float().cpu()
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return unpatchify(x[None], cell, grid)[0].permute(1, 2, 0).numpy()


def pixel_reconstruction(
    images: torch.Tensor,
    pred: torch.Tensor,
    cell: int,
    normalize: bool = True,
) -> torch.Tensor:
    """Undo a pixel target's per-cell normalisation on a prediction.

    Args:
        images: (B, 3, H, W) the model's (ImageNet-normalised) inputs.
        pred: (B, N, cell^2 * 3) predicted cells in raster order.
        cell: cell side in pixels.
        normalize: the target was normalised per cell (``target.normalize``): the prediction is
            rescaled with each cell's own mean and std, taken from the input (as MAE shows it).

    Returns:
        (B, 3, H, W) the prediction in the inputs' (normalised) space.
    """
    x = pred.detach().float()
    if normalize:
        cells = patchify(images.detach().float(), cell)
        mean = cells.mean(dim=-1, keepdim=True)
        var = cells.var(dim=-1, keepdim=True, unbiased=True)
        x = x * (var + 1.0e-6).sqrt() + mean
    grid = (images.shape[-2] // cell, images.shape[-1] // cell)
    return unpatchify(x, cell, grid)


def masked_image(image: np.ndarray, mask: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Grey out the masked patches of an (H, W, 3) image; ``mask`` is (L,) with True = masked."""
    m = _patch_mask(mask, grid, image.shape[:2])
    return image * (1 - m) + 0.5 * m


def _patch_mask(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    m = mask.detach().float().cpu().reshape(1, 1, *grid)
    m = torch.nn.functional.interpolate(m, size=tuple(size), mode="nearest")
    return m[0, 0].numpy()[..., None]


# -- figures -----------------------------------------------------------------------------------


def _blank(ax, title: str | None = None, fontsize: float = 7) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def reconstruction_figure(
    images: torch.Tensor,
    out,
    tap_names: Sequence[str],
    patch_grid: tuple[int, int],
    target,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    title: str | None = None,
    scores: Sequence[CellScores] | None = None,
    zoom: int = 2,
) -> Figure:
    """Targets against predictions of a pre-training forward, one row per image.

    HOG targets: the input (the enlarged window outlined), the masked input, then per tap the
    target and the prediction as strokes of each cell's oriented part (:func:`hog_picture` with
    ``floor=True``; a prediction of the average histogram is dark), masked (scored) cells bright
    on blue, visible cells dimmed on black (the prediction panel shows the target there), and
    last an enlarged ``zoom x zoom``-patch window of the finest tap. Each tap's targets share one
    brightness scale, its predictions another (:func:`oriented_scale` over the masked cells):
    predictions trained with MSE hedge towards the mean and are weaker, and the column title
    gives the gain ``xN`` they are drawn with. Pixel targets: the familiar MAE
    strip, de-normalised: masked input, each tap's reconstruction with the visible patches
    pasted in, original.

    Args:
        images: (B, 3, H, W) the model's inputs (normalised with ``mean`` and ``std``).
        out: the forward's :class:`lmim.models.LocalMIMOutput` (``mask``, ``preds``,
            ``targets``, ``weights``, ``grids``); its first B images are drawn.
        tap_names: per tap label.
        patch_grid: the encoder's mask grid (rows, cols).
        target: the model's target module (``lmim.targets.HOG`` or ``NormalizedPixels``).
        mean, std: the inputs' normalisation.
        title: figure title.
        scores: per tap :class:`CellScores`, printed above the tap's prediction column.
        zoom: side of the enlarged window in patches (HOG).

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    n = images.shape[0]  # the output may hold more images (e.g. those scored)
    out = dataclasses.replace(
        out,
        preds=[p[:n] for p in out.preds],
        targets=[t[:n] for t in out.targets],
        weights=[w[:n] for w in out.weights],
        mask=out.mask[:n],
    )
    return target.figure(images, out, tap_names, patch_grid, mean, std, title, scores, zoom)


def _score_label(scores: Sequence[CellScores] | None, k: int) -> str:
    return "" if scores is None else f"\nR² {scores[k].r2:.2f}"


def hog_figure(images, out, tap_names, patch_grid, nbins, mean, std, title, scores, zoom):
    """The reconstruction picture of HOG targets (:meth:`lmim.targets.HOG.figure`)."""
    B, T = images.shape[0], len(tap_names)
    shown = denormalize(images.detach().float().cpu(), mean, std)
    fine = max(range(T), key=lambda k: out.grids[k][0] * out.grids[k][1])  # most cells
    fg = tuple(out.grids[fine])
    targets = [[t.detach().float().cpu() for t in out.targets[k]] for k in range(T)]
    preds = [[p.detach().float().cpu() for p in out.preds[k]] for k in range(T)]
    weights = [[w.detach().float().cpu() for w in out.weights[k]] for k in range(T)]
    # One brightness scale per tap and kind, shared by the rows: targets over all their cells,
    # predictions over the masked cells they are scored on. MSE-trained predictions hedge
    # towards the mean, so their oriented parts are weaker; the title gives the gain.
    t_scale = [oriented_scale(targets[k], nbins) for k in range(T)]
    p_scale = [
        oriented_scale([p[w > 0] for p, w in zip(preds[k], weights[k], strict=True)], nbins, 95)
        for k in range(T)
    ]
    cols = 2 + 2 * T + 2
    panel = 1.45
    fig = Figure(figsize=(panel * cols, panel * B + 0.8), layout="constrained")
    axes = fig.subplots(B, cols, squeeze=False)
    H, W = shown.shape[-2:]
    rows_p, cols_p = patch_grid
    for b in range(B):
        img = shown[b].permute(1, 2, 0).numpy()
        mask = out.mask[b].detach().cpu()
        ax = axes[b]
        ax[0].imshow(img, interpolation="nearest")
        ax[1].imshow(masked_image(img, mask, patch_grid), interpolation="nearest")
        _blank(ax[0], "input\n(box: enlarged)" if b == 0 else None)
        _blank(ax[1], "masked input" if b == 0 else None)
        for k, name in enumerate(tap_names):
            grid = tuple(out.grids[k])
            t, p, w = targets[k][b], preds[k][b], weights[k][b]
            cell_px = int(np.clip(round(288 / max(grid)), 5, 24))
            pics = (
                hog_panel(t, grid, nbins, cell_px, t_scale[k], w),
                hog_panel(p, grid, nbins, cell_px, p_scale[k], w, t, t_scale[k]),
            )
            gain = t_scale[k] / p_scale[k]
            labels = (
                f"{name} target\n{grid[0]}x{grid[1]} HOG cells",
                f"{name} prediction x{gain:.1f}{_score_label(scores, k)}",
            )
            for j, pic in enumerate(pics):
                a = ax[2 + 2 * k + j]
                a.imshow(pic, interpolation="antialiased")
                _blank(a, labels[j] if b == 0 else None)
        # The enlarged window of the finest tap.
        t, p, w = targets[fine][b], preds[fine][b], weights[fine][b]
        r0, c0 = zoom_window(mask, patch_grid, hog_cells(t, fg, nbins), zoom)
        z = min(zoom, rows_p, cols_p)
        s = fg[0] // rows_p
        cells = np.arange(fg[0] * fg[1]).reshape(fg)
        sel = torch.as_tensor(cells[r0 * s : (r0 + z) * s, c0 * s : (c0 + z) * s].reshape(-1))
        zg = (z * s, z * s)
        cell_px = int(np.clip(round(288 / zg[0]), 8, 32))
        ts, ps = t_scale[fine], p_scale[fine]
        pics = (
            hog_panel(t[sel], zg, nbins, cell_px, ts, w[sel]),
            hog_panel(p[sel], zg, nbins, cell_px, ps, w[sel], t[sel], ts),
        )
        for j, pic in enumerate(pics):
            a = ax[2 + 2 * T + j]
            a.imshow(pic, interpolation="antialiased")
            for q in range(1, z):  # patch borders
                a.axhline(q * s * cell_px - 0.5, color="0.6", lw=0.5)
                a.axvline(q * s * cell_px - 0.5, color="0.6", lw=0.5)
            what = "target" if j == 0 else f"prediction x{ts / ps:.1f}"
            label = f"{tap_names[fine]} {what},\nenlarged {zg[0]}x{zg[1]} cells"
            _blank(a, label if b == 0 else None)
        ph, pw = H / rows_p, W / cols_p
        box = Rectangle((c0 * pw - 0.5, r0 * ph - 0.5), z * pw, z * ph, fill=False, ec="yellow")
        ax[0].add_patch(box)
    legend = (
        "strokes: each cell's oriented part (bins above its weakest); masked cells (scored) on "
        "blue, visible ones dimmed; predictions brightened xN to the targets' scale"
    )
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=8)
    return fig


def pixel_figure(images, out, tap_names, patch_grid, target, mean, std, title, scores):
    """The reconstruction picture of pixel targets (``NormalizedPixels.figure``)."""
    B, T = images.shape[0], len(tap_names)
    x = images.detach().float().cpu()
    shown = denormalize(x, mean, std)
    cols = T + 2
    panel = 1.6
    fig = Figure(figsize=(panel * cols, panel * B + 0.7), layout="constrained")
    axes = fig.subplots(B, cols, squeeze=False)
    normalize = bool(getattr(target, "normalize", True))
    recons = []
    for k in range(T):
        cell = int(target.cell_sizes[k])
        r = pixel_reconstruction(x, out.preds[k].detach().cpu(), cell, normalize)
        recons.append(denormalize(r, mean, std))
    for b in range(B):
        img = shown[b].permute(1, 2, 0).numpy()
        m = _patch_mask(out.mask[b], patch_grid, img.shape[:2])
        ax = axes[b]
        ax[0].imshow(masked_image(img, out.mask[b], patch_grid), interpolation="nearest")
        _blank(ax[0], "masked input" if b == 0 else None)
        for k, name in enumerate(tap_names):
            rec = recons[k][b].permute(1, 2, 0).numpy()
            ax[1 + k].imshow(rec * m + img * (1 - m), interpolation="nearest")
            cell = target.cell_sizes[k]
            label = f"{name} reconstruction\n{cell}-px cells, visible pasted"
            _blank(ax[1 + k], label + _score_label(scores, k) if b == 0 else None)
        ax[-1].imshow(img, interpolation="nearest")
        _blank(ax[-1], "original" if b == 0 else None)
    legend = (
        "reconstructions: the predicted normalised cells, de-normalised with the mean and std of "
        "the original's cells (as MAE shows them), visible patches pasted in"
    )
    if normalize:
        fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=8)
    elif title:
        fig.suptitle(title, fontsize=8)
    return fig
