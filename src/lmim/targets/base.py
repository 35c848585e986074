"""What every reconstruction target shares: cell bookkeeping and float32 computation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmim.errors import ConfigError


def cell_grid(size: tuple[int, int], cell: float, what: str = "target") -> tuple[int, int]:
    """Cells of side ``cell`` pixels that tile an image of ``size`` = (H, W); must be whole."""
    rows, cols = size[0] / cell, size[1] / cell
    if abs(rows - round(rows)) > 1e-6 or abs(cols - round(cols)) > 1e-6:
        raise ConfigError(
            f"{what}: {cell}-px cells do not tile a {size[0]}x{size[1]} image: choose "
            f"data.img_size as a multiple of {cell}"
        )
    return int(round(rows)), int(round(cols))


class Target(nn.Module):
    """A frozen map from normalised images to per-cell targets at several cell sizes.

    Subclasses implement :meth:`compute`. Calls always run in float32 with autocast off and
    without gradients, whatever the surrounding precision.

    Args:
        cell_sizes: cell side in pixels for each output, e.g. (4, 8, 16, 32).
    """

    def __init__(self, cell_sizes: Sequence[float]) -> None:
        super().__init__()
        if not cell_sizes:
            raise ConfigError("a target needs at least one cell size (one per tap)")
        self.cell_sizes = [float(c) if float(c) != int(c) else int(c) for c in cell_sizes]

    @property
    def dims(self) -> list[int]:
        """Feature width of each output."""
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        # Whole-model casts (Lightning's bf16-true / 16-true, ``model.half()``) would turn the
        # fixed filters into half precision; targets are computed in float32, so keep them so.
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Targets of a batch.

        Args:
            images: (B, 3, H, W) images (ImageNet-normalised in training).

        Returns:
            One (B, N_k, dims[k]) float32 tensor per cell size, cells in raster order.
        """
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.compute(images.float())
