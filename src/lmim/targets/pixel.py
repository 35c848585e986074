"""Per-patch normalised pixel target (LocalMIM section 3.3, MAE's ``norm_pix_loss``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmim.errors import ConfigError
from lmim.targets.base import Target, cell_grid


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), p * p * C), features ordered (row, col, channel)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, h * w, p * p * C) -> (B, C, h * p, w * p)."""
    B = x.shape[0]
    h, w = grid
    x = x.reshape(B, h, w, p, p, chans)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, chans, h * p, w * p)


class NormalizedPixels(Target):
    """Pixels of each cell, optionally normalised per cell (mean 0, unbiased std 1).

    Args:
        cell_sizes: patch side in pixels per output; must be whole numbers.
        normalize: subtract the cell mean and divide by sqrt(unbiased var + 1e-6).
        in_chans: image channels.
    """

    def __init__(
        self,
        cell_sizes: Sequence[float] = (4, 8, 16, 32),
        normalize: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__(cell_sizes)
        for c in self.cell_sizes:
            if float(c) != int(c):
                raise ConfigError(
                    f"target=pixel needs whole-pixel cells, but a tap asks for {c}-px cells "
                    "(patch size / scale): change schedule.scales so that each divides the patch "
                    "size, or use target=hog"
                )
        self.normalize = normalize
        self.in_chans = in_chans

    @property
    def dims(self) -> list[int]:
        return [int(c) ** 2 * self.in_chans for c in self.cell_sizes]

    def figure(self, images, out, tap_names, patch_grid, mean, std, title, scores, zoom):
        """Cells shown as pixels (de-normalised with the input's cell statistics)."""
        from lmim.viz import pixel_figure

        return pixel_figure(images, out, tap_names, patch_grid, self, mean, std, title, scores)

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for c in self.cell_sizes:
            cell_grid(tuple(images.shape[-2:]), c, "pixel target")
            x = patchify(images, int(c))
            if self.normalize:
                mean = x.mean(dim=-1, keepdim=True)
                var = x.var(dim=-1, keepdim=True, unbiased=True)
                x = (x - mean) / (var + 1.0e-6).sqrt()
            outs.append(x)
        return outs
