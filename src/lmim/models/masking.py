"""Random patch masking and the index bookkeeping of visible-only encoding."""

from __future__ import annotations

import torch

from lmim.errors import ConfigError


def check_mask_ratio(ratio: float, key: str = "model.mask_ratio") -> float:
    """Validate a mask ratio, which must lie strictly between 0 and 1."""
    if not 0.0 < float(ratio) < 1.0:
        raise ConfigError(
            f"{key}={ratio} must lie strictly between 0 and 1 (the share of patches hidden "
            f"from the encoder): set e.g. {key}=0.75"
        )
    return float(ratio)


def num_visible(num_patches: int, ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - r))`` as in MAE and LocalMIM (49 of 196 at 0.75)."""
    keep = int(num_patches * (1.0 - ratio))
    if keep < 1:
        raise ConfigError(
            f"model.mask_ratio={ratio} leaves no visible patch out of {num_patches}: lower it"
        )
    return keep


def random_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample uniform random mask (argsort of uniform noise, as in MAE).

    Returns:
        (B, L) bool, True = masked, raster order; every row hides ``L - int(L (1 - r))`` patches.
    """
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_shuffle[:, :keep], False)
    return mask


def mask_indices(
    mask: torch.Tensor, num_keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather/scatter indices for a mask.

    Args:
        mask: (B, L) bool or 0/1, True/1 = masked. Every row must hide the same number.
        num_keep: visible patches per row when known (a mask from :func:`random_mask`); skips
            the check of the row counts, which would synchronise a GPU.

    Returns:
        ids_keep: (B, V) raster indices of the visible patches, in raster order.
        ids_restore: (B, L) position of each raster patch in the ``[visible, masked]`` sequence,
            so that ``seq.gather(1, ids_restore)`` puts a ``[visible, mask tokens]`` sequence
            back in raster order.
    """
    if mask.dim() != 2:
        raise ConfigError(f"mask must have shape (B, L), got {tuple(mask.shape)}")
    mask = mask.bool()
    if num_keep is None:
        counts = mask.sum(dim=1)
        if counts.numel() and bool((counts != counts[0]).any()):
            raise ConfigError(
                "every sample's mask must hide the same number of patches (visible-only "
                f"encoding batches them), got per-sample counts {counts.tolist()}"
            )
        num_keep = mask.shape[1] - int(counts[0]) if counts.numel() else mask.shape[1]
    # A stable sort puts visible patches first, each group in raster order.
    ids_shuffle = mask.to(torch.int8).argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle[:, :num_keep], ids_restore
