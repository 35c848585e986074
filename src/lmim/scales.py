"""Scales: a tap's target grid is the encoder's patch grid times a power of two."""

from __future__ import annotations

import math

from lmim.errors import ConfigError


def scale_exponent(scale: float, key: str = "schedule.scales") -> int:
    """log2 of a scale that must be a power of two (..., 0.25, 0.5, 1, 2, 4, ...)."""
    if scale <= 0:
        raise ConfigError(f"{key}: scale {scale} must be a positive power of two (0.5, 1, 2, 4)")
    k = math.log2(scale)
    if abs(k - round(k)) > 1e-9:
        raise ConfigError(
            f"{key}: scale {scale} is not a power of two; the decoder up-samples with stride-2 "
            "transposed convs and down-samples with 2x2 pooling, so use 0.5, 1, 2, 4, ..."
        )
    return int(round(k))


def scaled_grid(
    grid: tuple[int, int], scale: float, key: str = "schedule.scales"
) -> tuple[int, int]:
    """The target grid of a tap: the patch grid times its scale, which must be whole."""
    k = scale_exponent(scale, key)
    if k >= 0:
        return grid[0] << k, grid[1] << k
    f = 1 << -k
    if grid[0] % f or grid[1] % f:
        raise ConfigError(
            f"{key}: scale {scale} on the {grid[0]}x{grid[1]} patch grid gives a non-integer "
            f"{grid[0] / f}x{grid[1] / f} grid: choose data.img_size so that the patch grid is "
            f"divisible by {f}, or a larger scale"
        )
    return grid[0] // f, grid[1] // f
