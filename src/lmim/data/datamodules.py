"""Lightning DataModules: any ImageFolder tree (ImageNet layout) and the embedded demo photos."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform
from lmim.errors import ConfigError


class _PretrainDataModule(L.LightningDataModule):
    """Shared loader settings. ``batch_size`` is per device; the global batch is
    ``batch_size x devices x nodes x accumulate_grad_batches``."""

    def __init__(
        self,
        img_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1 (images per device)")
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_set: Dataset | None = None

    def train_transform(self):
        return pretrain_transform(self.img_size, self.crop_scale, self.hflip, self.mean, self.std)

    def preview_transform(self):
        return eval_transform(self.img_size, self.mean, self.std)

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the data cannot be read; called before training."""

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.drop_last and len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"the training set has {len(self.train_set)} images, fewer than one batch "
                f"(data.batch_size={self.batch_size}): lower data.batch_size or add images"
            )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )


class ImageFolderDataModule(_PretrainDataModule):
    """Images under ``root/<split>/<class>/*`` (the ImageNet layout); labels are unused.

    Args:
        root: dataset root holding ``split``.
        split: sub-folder read for pre-training (``train``).
        **kwargs: loader and augmentation settings of the base class.
    """

    def __init__(self, root: str | None = None, split: str = "train", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.split = split

    @property
    def split_dir(self) -> Path:
        return Path(os.path.expanduser(str(self.root))) / self.split

    def validate(self) -> None:
        if self.root in (None, "", "???"):
            raise ConfigError(
                "data.root is not set: pass data.root=/path/to/imagenet (a folder holding "
                f"{self.split}/<class>/<images>), or use data=demo for the embedded photos"
            )
        root = Path(os.path.expanduser(str(self.root)))
        if not root.is_dir():
            raise ConfigError(
                f"data.root={self.root} does not exist: point data.root at a folder holding "
                f"{self.split}/<class>/<images> (the ImageNet layout), or use data=demo"
            )
        split = self.split_dir
        if not split.is_dir():
            raise ConfigError(
                f"data.root={self.root} has no '{self.split}' folder: expected "
                f"{split}/<class>/<images>; set data.root to the folder that contains "
                f"'{self.split}' (or data.split to its name)"
            )
        for _, _, files in os.walk(split, followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
        raise ConfigError(
            f"data.root={self.root}: {split} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, "
            f"...) in class sub-folders: expected {split}/<class>/<images>"
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.validate()
            self.train_set = ImageFolder(str(self.split_dir), transform=self.train_transform())

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic normalised views of the first images of distinct classes."""
        if self.train_set is None:
            self.setup("fit")
        ds: ImageFolder = self.train_set
        picks, seen = [], set()
        for path, label in ds.samples:
            if label not in seen:
                seen.add(label)
                picks.append(path)
            if len(picks) == n:
                break
        for path, _ in ds.samples:
            if len(picks) >= n:
                break
            if path not in picks:
                picks.append(path)
        tf = self.preview_transform()
        return torch.stack([tf(ds.loader(p)) for p in picks])


# Colour and grey photographs bundled with scikit-image (CC0 / public domain; no download).
DEMO_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "clock",
    "moon",
    "brick",
    "grass",
    "gravel",
    "text",
)


def load_demo_images(names: Sequence[str] = DEMO_IMAGES) -> list[Image.Image]:
    """The named ``skimage.data`` photos as RGB PIL images."""
    import skimage.data

    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ConfigError(f"data.images: skimage.data has no image '{name}'")
        try:
            arr = np.asarray(loader())
        except Exception as err:  # loaders of non-bundled images try to download
            raise ConfigError(
                f"data.images: skimage.data.{name} is not bundled with scikit-image (it needs a "
                f"download: {type(err).__name__}); use the bundled ones, e.g. {DEMO_IMAGES[:4]}"
            ) from err
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) - arr.min()) / max(np.ptp(arr), 1e-12)).astype(
                np.uint8
            )
        img = Image.fromarray(arr)
        images.append(img.convert("RGB"))
    return images


class RandomCrops(Dataset):
    """An epoch of ``length`` random augmented views of a few photos; label = photo index."""

    def __init__(self, images: Sequence[Image.Image], length: int, transform) -> None:
        self.images = list(images)
        self.length = length
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % len(self.images)
        return self.transform(self.images[label]), label


class DemoDataModule(_PretrainDataModule):
    """Random crops of the photos bundled with scikit-image: the embedded default data.

    Args:
        images: ``skimage.data`` names.
        samples_per_epoch: crops per epoch.
        **kwargs: loader and augmentation settings of the base class.
    """

    def __init__(
        self, images: Sequence[str] = DEMO_IMAGES, samples_per_epoch: int = 1024, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.images = list(images)
        self.samples_per_epoch = samples_per_epoch
        self._photos: list[Image.Image] | None = None

    def validate(self) -> None:
        if not self.images:
            raise ConfigError("data.images is empty: list skimage.data photos, e.g. [astronaut]")
        if self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch={self.samples_per_epoch} must be >= 1")

    def photos(self) -> list[Image.Image]:
        if self._photos is None:
            self.validate()
            self._photos = load_demo_images(self.images)
        return self._photos

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = RandomCrops(
                self.photos(), self.samples_per_epoch, self.train_transform()
            )

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic centre views of the first n photos."""
        tf = self.preview_transform()
        return torch.stack([tf(img) for img in self.photos()[:n]])
