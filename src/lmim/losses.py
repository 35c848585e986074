"""LocalMIM's loss (section 4): masked mean squared error per tap, summed over taps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmim.scales import scale_exponent


def scale_mask(mask: torch.Tensor, grid: tuple[int, int], scale: float) -> torch.Tensor:
    """Loss weights of a tap's cells from the patch mask.

    Scale >= 1 repeats each patch's value over its sub-cells; scale < 1 averages groups of
    patches, so a coarse cell that is partly visible gets a fractional weight (0.25, 0.5, ...).

    Args:
        mask: (B, L) patch mask, 1 = masked, raster order over ``grid``.
        grid: patch grid (rows, cols).
        scale: target grid / patch grid.

    Returns:
        (B, L * scale^2) float weights in raster order over the target grid.
    """
    k = scale_exponent(scale)
    m = mask.float().reshape(mask.shape[0], 1, *grid)
    if k > 0:
        m = m.repeat_interleave(1 << k, dim=2).repeat_interleave(1 << k, dim=3)
    elif k < 0:
        m = F.avg_pool2d(m, 1 << -k)
    return m.flatten(1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over cells of the per-cell mean squared error, in float32.

    Args:
        pred: (B, N, D) predictions.
        target: (B, N, D) targets.
        weight: (B, N) cell weights (1 = masked, 0 = visible, fractions at coarse scales).

    Returns:
        Scalar ``sum(w * mean_D (pred - target)^2) / sum(w)`` over the whole batch.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (err * weight).sum() / weight.sum().clamp_min(1e-12)
