"""Pictures a person can read: HOG glyphs, pixel targets and reconstruction figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lmim.targets.pixel import unpatchify


def hog_glyphs(nbins: int, size: int) -> np.ndarray:
    """(nbins, size, size) line templates, one per orientation bin.

    The bins hold unsigned gradient orientations; an edge runs perpendicular to its gradient, so
    each glyph is a line through the cell centre at the bin-centre orientation + 90 degrees.
    With ``theta = atan2(g_lr, g_tb)`` a gradient along x (a vertical edge) has theta = pi/2,
    and its glyph is a vertical line.
    """
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - c
    glyphs = np.zeros((nbins, size, size))
    for b in range(nbins):
        theta = (b + 0.5) * math.pi / nbins
        # gradient direction in (x, y) = (sin theta, cos theta); the edge is perpendicular to it
        gx, gy = math.sin(theta), math.cos(theta)
        dist = np.abs(xx * gx + yy * gy)  # distance from the edge line through the centre
        along = np.abs(-xx * gy + yy * gx)
        glyphs[b] = np.clip(1.0 - dist, 0, 1) * (along <= c)
    return glyphs


def hog_picture(
    feats: torch.Tensor | np.ndarray, grid: tuple[int, int], nbins: int, cell_px: int = 12
) -> np.ndarray:
    """Render HOG cells as oriented strokes (brighter = stronger), averaged over colours.

    Args:
        feats: (h * w, C * nbins) HOG features of one image, cells in raster order.
        grid: (h, w).
        nbins: orientation bins.
        cell_px: rendered side of one cell.

    Returns:
        (h * cell_px, w * cell_px) float image in [0, 1].
    """
    f = torch.as_tensor(feats).float().cpu().numpy()
    h, w = grid
    f = f.reshape(h, w, -1, nbins).clip(min=0).mean(axis=2)  # (h, w, nbins)
    # Max over bins, not sum: every glyph crosses the cell centre, and a sum would turn it into
    # a bright dot that hides the orientations.
    glyphs = hog_glyphs(nbins, cell_px)
    img = (f[:, :, :, None, None] * glyphs[None, None]).max(axis=2)  # (h, w, S, S)
    img = img.transpose(0, 2, 1, 3).reshape(h * cell_px, w * cell_px)
    top = img.max()
    return img / top if top > 0 else img


def pixel_picture(feats: torch.Tensor, grid: tuple[int, int], cell: int) -> np.ndarray:
    """Per-cell pixel targets (B-less, (h * w, cell^2 * 3)) -> an (H, W, 3) image in [0, 1].

    Each cell is min-max stretched on its own, since normalised-pixel targets have no common scale.
    """
    x = torch.as_tensor(feats).float().cpu()
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return unpatchify(x[None], cell, grid)[0].permute(1, 2, 0).numpy()


def masked_image(image: np.ndarray, mask: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Grey out the masked patches of an (H, W, 3) image; ``mask`` is (L,) with True = masked."""
    H, W = image.shape[:2]
    m = mask.float().reshape(1, 1, *grid)
    m = torch.nn.functional.interpolate(m, size=(H, W), mode="nearest")[0, 0].numpy()[..., None]
    return image * (1 - m) + 0.5 * m


def reconstruction_figure(
    images: torch.Tensor,
    mask: torch.Tensor,
    preds: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    patch_grid: tuple[int, int],
    tap_names: Sequence[str],
    target_kind: str = "hog",
    nbins: int = 9,
    cell_sizes: Sequence[float] = (),
    title: str | None = None,
):
    """One row per image: input, masked input, then target and prediction for every tap.

    Args:
        images: (B, 3, H, W) images in [0, 1].
        mask: (B, L) bool, True = masked.
        preds, targets: per tap (B, N_k, D_k).
        grids: per tap target grid (h_k, w_k).
        patch_grid: encoder patch grid.
        tap_names: per tap label.
        target_kind: "hog" or "pixel".
        nbins: HOG bins (for "hog").
        cell_sizes: pixel cell size per tap (for "pixel").
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = images.shape[0]
    cols = 2 + 2 * len(preds)
    fig, axes = plt.subplots(B, cols, figsize=(1.9 * cols, 1.95 * B + 0.4), squeeze=False)
    for b in range(B):
        img = images[b].permute(1, 2, 0).float().cpu().numpy()
        panels = [
            (img, "input", None),
            (masked_image(img, mask[b].cpu(), patch_grid), "mask", None),
        ]
        for k, name in enumerate(tap_names):
            for what, src in (("target", targets[k]), ("pred", preds[k])):
                if target_kind == "hog":
                    pic = hog_picture(src[b].detach(), grids[k], nbins)
                    panels.append((pic, f"{name} {what}\n{grids[k][0]}x{grids[k][1]} HOG", "gray"))
                else:
                    pic = pixel_picture(src[b].detach(), grids[k], int(cell_sizes[k]))
                    panels.append((pic, f"{name} {what}\n{grids[k][0]}x{grids[k][1]} px", None))
        for ax, (pic, label, cmap) in zip(axes[b], panels, strict=True):
            ax.imshow(pic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
