"""Histogram-of-oriented-gradients target (LocalMIM section 3.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmim.targets.base import Target, cell_grid


def pool_cells(x: torch.Tensor, cell: float) -> torch.Tensor:
    """Average over non-overlapping ``cell`` x ``cell`` pixel cells.

    Args:
        x: (B, C, H, W).
        cell: cell side; a non-integer side (e.g. 3.5 px for 14-px patches at scale 4) uses
            adaptive pooling, whose cells are 3 or 4 px wide and overlap by at most a pixel.

    Returns:
        (B, C, H / cell, W / cell).
    """
    if float(cell) == int(cell):
        return F.avg_pool2d(x, int(cell), stride=int(cell))
    return F.adaptive_avg_pool2d(x, cell_grid(tuple(x.shape[-2:]), cell, "HOG"))


class HOG(Target):
    """HOG features per colour channel, pooled over cells of several sizes.

    For each colour channel: Sobel gradients (reflect padding), magnitude, unsigned orientation
    ``atan2(g_lr, g_tb)`` hard-assigned to one of ``nbins`` bins of width pi / nbins, average
    pooling of each bin over cells, L2 normalisation over the bins of a cell (an all-zero cell
    stays zero). Output per cell: ``[R bins, G bins, B bins]``, width 3 * nbins.

    The per-pixel histogram is computed once and pooled at every cell size (coarser cells pool the
    finer pooled map when they nest); the released code recomputed it for every scale and channel.

    The one numerical departure from the released code, where its value is rounding noise: the
    Sobel responses are differences of neighbouring pixels (:meth:`gradients`), so equal
    neighbours give exactly 0, where the released 2-D convolution may leave ~1e-7. Hence (a) a
    cell with no gradient is exactly 0 here, while in the released code the L2 normalisation
    turns that rounding into a unit vector in a noise-chosen direction; and (b) an exactly
    vertical gradient (g0 = 0, g1 != 0; atan2 gives 0 or +-pi) falls in bin 0 here, while the
    released code puts it in bin 0 or ``nbins - 1`` by the sign of the rounding. Both are
    common on 8-bit photos (flat regions, straight edges). Everywhere else the two agree to
    rounding (5e-6). This arithmetic is kept: it is deterministic and device-independent
    (elementwise float32 operations, no convolution algorithm to pick). Where unequal 8-bit
    neighbours cancel exactly, its float32 g0 can be rounding too.
    ``tests/test_targets.py::test_hog_departs_from_the_released_code_only_where_it_is_rounding_noise``
    pins both cases on a real photo and gives the shares of cells.

    Args:
        nbins: orientation bins over [0, pi) (9 or 18 in LocalMIM).
        cell_sizes: cell side in pixels per output (ViT: 4, 8, 16, 32; Swin: 8, 16, 32, 32).
        bias: add a frozen random bias to the two Sobel responses, drawn once per cell size
            from U(-1/3, 1/3) like PyTorch's Conv2d bias init and stored in the state dict
            (LocalMIM's ``hog_bias``). With it the target depends on the input normalisation.
        in_chans: image channels, each histogrammed separately.
    """

    def __init__(
        self,
        nbins: int = 9,
        cell_sizes: Sequence[float] = (4, 8, 16, 32),
        bias: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__(cell_sizes)
        if nbins < 1:
            raise ValueError(f"target.nbins={nbins} must be >= 1")
        self.nbins = nbins
        self.in_chans = in_chans
        self.use_bias = bias
        k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # left - right
        self.register_buffer("sobel", torch.stack([k0, k0.T]).unsqueeze(1), persistent=False)
        if bias:
            self.register_buffer(
                "bias", torch.empty(len(self.cell_sizes), 2).uniform_(-1 / 3, 1 / 3)
            )
        else:
            self.bias = None

    @property
    def dims(self) -> list[int]:
        return [self.in_chans * self.nbins] * len(self.cell_sizes)

    def gradients(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * C, 2, H, W) Sobel responses (left-right, top-bottom).

        The separable form of the 3x3 Sobel filters on the reflect-padded channel: a difference
        two pixels apart, then a (1, 2, 1) smoothing across it. Equal to ``conv2d`` with
        :attr:`sobel` and 4x cheaper on CPUs than a 2-output-channel convolution.
        """
        B, C, H, W = images.shape
        x = F.pad(images.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="reflect")[:, 0]
        d = x[:, :, :-2] - x[:, :, 2:]  # left - right, (BC, H + 2, W)
        s = x[:, :-2] - x[:, 2:]  # top - bottom, (BC, H, W + 2)
        g_lr = d[:, :-2] + 2 * d[:, 1:-1] + d[:, 2:]
        g_tb = s[:, :, :-2] + 2 * s[:, :, 1:-1] + s[:, :, 2:]
        return torch.stack([g_lr, g_tb], dim=1)

    def _bins(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B * C, 2, H, W) gradients -> (B * C, H, W) magnitudes and their orientation bins."""
        g0, g1 = grad[:, 0], grad[:, 1]
        mag = torch.sqrt(g0 * g0 + g1 * g1)
        phase = torch.atan2(g0, g1)
        idx = torch.floor(phase * (self.nbins / math.pi)).long().remainder_(self.nbins)
        return mag, idx

    def histogram(self, grad: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * C, 2, H, W) gradients -> (B, C * nbins, H, W) hard-assigned magnitudes."""
        mag, idx = self._bins(grad)
        hist = torch.zeros(
            grad.shape[0], self.nbins, *grad.shape[-2:], dtype=grad.dtype, device=grad.device
        )
        hist.scatter_(1, idx.unsqueeze(1), mag.unsqueeze(1))
        return hist.reshape(batch, -1, *grad.shape[-2:])

    def cell_histogram(self, grad: torch.Tensor, batch: int, cell: int) -> torch.Tensor:
        """(B * C, 2, H, W) gradients -> (B, C * nbins, H / cell, W / cell): the histogram
        averaged over ``cell`` x ``cell`` cells, ``pool_cells(histogram(grad), cell)`` without
        the per-pixel histogram (each pixel's magnitude is added straight to its cell's bin)."""
        mag, idx = self._bins(grad)
        BC, H, W = mag.shape
        h, w = H // cell, W // cell
        rows = torch.arange(H, device=grad.device) // cell
        cols = torch.arange(W, device=grad.device) // cell
        where = (rows[:, None] * w + cols[None, :]).expand(BC, H, W)  # cell of each pixel
        slot = (idx * (h * w) + where).reshape(BC, -1)
        out = mag.new_zeros(BC, self.nbins * h * w)
        out.scatter_add_(1, slot, mag.reshape(BC, -1))
        return out.div_(cell * cell).reshape(batch, -1, h, w)

    def _pooled(self, grad: torch.Tensor, batch: int, cell: float) -> torch.Tensor:
        # scatter_add_ adds in a racy order on GPUs: keep the per-pixel map in deterministic mode.
        racy = grad.is_cuda and torch.are_deterministic_algorithms_enabled()
        if float(cell).is_integer() and not racy:
            return self.cell_histogram(grad, batch, int(cell))
        return pool_cells(self.histogram(grad, batch), cell)

    def normalize(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C * nbins, h, w) -> (B, h * w, C * nbins), L2-normalised per colour channel."""
        B, _, h, w = pooled.shape
        x = pooled.reshape(B, self.in_chans, self.nbins, h, w)
        # F.normalize(x, dim=2) spelled out: its norm kernel is slow across a strided dim on CPUs
        x = x / x.square().sum(dim=2, keepdim=True).sqrt().clamp_min(1e-12)
        return x.reshape(B, -1, h * w).transpose(1, 2)

    def figure(self, images, out, tap_names, patch_grid, mean, std, title, scores, zoom):
        """Histograms drawn as oriented glyphs per cell, with an enlarged window."""
        from lmim.viz import hog_figure

        return hog_figure(
            images, out, tap_names, patch_grid, self.nbins, mean, std, title, scores, zoom
        )

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        B = images.shape[0]
        for cell in self.cell_sizes:
            cell_grid(tuple(images.shape[-2:]), cell, "HOG target")
        grad = self.gradients(images)
        outs: list[torch.Tensor] = []
        if self.bias is None:
            # One histogram for every scale: the finest cells are summed from the pixels, and
            # coarser nested cells pool the finer pooled map.
            pooled: dict[float, torch.Tensor] = {}
            for cell in self.cell_sizes:
                if cell not in pooled:
                    src, src_cell = None, 1
                    for c, p in pooled.items():
                        if c > src_cell and float(cell / c).is_integer() and float(c).is_integer():
                            src, src_cell = p, c
                    if src is None:
                        pooled[cell] = self._pooled(grad, B, cell)
                    else:
                        pooled[cell] = pool_cells(src, cell / src_cell)
                outs.append(self.normalize(pooled[cell]))
            return outs
        for k, cell in enumerate(self.cell_sizes):
            biased = grad + self.bias[k].view(1, 2, 1, 1)
            outs.append(self.normalize(self._pooled(biased, B, cell)))
        return outs
