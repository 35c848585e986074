"""Fixed 2-D sine-cosine position embeddings (LocalMIM section 2.4, as in MAE)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding.

    Args:
        dim: output width, even.
        pos: (M,) positions.

    Returns:
        (M, dim): ``[sin(pos * w), cos(pos * w)]`` with ``w_i = 10000 ** (-i / (dim / 2))``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos embedding over a raster-ordered grid.

    The first half of the channels encodes the column (x) index, the second half the row (y)
    index. With ``cls_token`` an all-zero row is prepended.

    Args:
        dim: embedding width, divisible by 4.
        grid_size: (rows, cols).
        cls_token: prepend a zero row for the cls token.

    Returns:
        (1, [1 +] rows * cols, dim) float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows, cols = grid_size
    yy, xx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    emb = torch.cat([sincos_1d(dim // 2, xx.flatten()), sincos_1d(dim // 2, yy.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
