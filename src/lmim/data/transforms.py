"""Pre-training augmentation (LocalMIM section 6): RandomResizedCrop, flip, normalise; and the
deterministic evaluation view."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(
    img_size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> (3, img_size, img_size) normalised tensor."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(hflip),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 1.0,
) -> T.Compose:
    """Deterministic view: resize the short side to ``img_size / crop_pct``, centre crop
    ``img_size``, normalise. ``crop_pct=0.875`` at 224 px is the paper's evaluation view
    (resize 256, centre crop 224); 1.0 keeps the whole short side (previews, Fashion-MNIST)."""
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    return T.Compose(
        [
            T.Resize(math.floor(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def denormalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1] RGB."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
