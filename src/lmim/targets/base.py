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
    """A frozen map from normalised images to per-cell targets at several cell sizes, and what
    is specific to it: :class:`lmim.models.LocalMIM` calls these and knows no target by name.

    - :meth:`compute`: the per-cell outputs (subclasses implement it);
    - :attr:`dims`: each output's width, which sizes the decoder's head;
    - :meth:`loss`: the loss on masked cells (default: masked MSE);
    - :meth:`step_metrics`: what training logs about the targets (default: nothing);
    - :meth:`comparable`: predictions and targets in one space, for the masked-cell R²;
    - :attr:`precision`: ``"float32"`` (default) runs :meth:`compute` in float32 with autocast
      off, whatever the run's precision; ``"run"`` leaves it under the run's autocast (e.g. a
      teacher network in bf16);
    - :meth:`figure`: how the reconstruction picture draws targets and predictions.

    Calls never track gradients.

    Args:
        cell_sizes: cell side in pixels for each output, e.g. (4, 8, 16, 32).
    """

    precision: str = "float32"

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

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The loss of one tap: ``pred`` (B, N, dims[k]) against ``target`` on cells weighted by
        ``weight`` (B, N) (1 masked, 0 visible, fractions at coarse scales); a float32 scalar.
        Default: :func:`lmim.losses.masked_mse`."""
        from lmim.losses import masked_mse

        return masked_mse(pred, target, weight)

    def comparable(
        self, preds: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per tap, predictions and targets as (B, N_k, D) vectors of one space, which the
        masked-cell R² of the reconstruction callback compares; by default they are already
        (a codebook maps logits and indices to code vectors)."""
        return preds, targets

    def step_metrics(self, targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics of a batch's targets that training logs on logging steps (e.g. a codebook's
        usage), as ``{name: scalar tensor}``; none by default."""
        return {}

    def figure(self, images, out, tap_names, patch_grid, mean, std, title, scores, zoom):
        """The reconstruction picture (:func:`lmim.viz.reconstruction_figure` passes its
        arguments on); a target without one raises ``NotImplementedError``, which the
        reconstruction callback reports as a warning."""
        raise NotImplementedError(f"{type(self).__name__} has no reconstruction picture")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Targets of a batch.

        Args:
            images: (B, 3, H, W) images (ImageNet-normalised in training).

        Returns:
            One (B, N_k, dims[k]) tensor per cell size, cells in raster order; float32 unless
            :attr:`precision` is ``"run"``.
        """
        if self.precision == "run":
            return self.compute(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.compute(images.float())
