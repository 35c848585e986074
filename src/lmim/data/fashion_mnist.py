"""Fashion-MNIST (Zalando, MIT licence) from the Debian package ``dataset-fashion-mnist`` or any
folder of the standard idx files; the small real dataset of lmim's CPU-scale evaluations."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lmim.data.datamodules import _PretrainDataModule
from lmim.data.images import TrainSet
from lmim.errors import ConfigError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Pixel statistics of the Fashion-MNIST training images (grey, repeated on 3 channels).
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)


def _open(folder: Path, name: str):
    for candidate in (folder / name, folder / f"{name}.gz", folder / "FashionMNIST" / "raw" / name):
        if candidate.is_file():
            return gzip.open(candidate) if candidate.suffix == ".gz" else open(candidate, "rb")
    return None


def find_root(root: str | None) -> Path:
    """The folder holding the idx files: ``root`` if given, else the Debian package's."""
    folder = Path(os.path.expanduser(root)) if root else Path(DEBIAN_DIR)
    if _open(folder, FILES["test"][0]) is None:
        where = f"data.root={root}" if root else f"the Debian package folder {DEBIAN_DIR}"
        raise ConfigError(
            f"Fashion-MNIST not found in {where}: install it with `make fashion-mnist` (runs "
            "`apt-get install -y dataset-fashion-mnist`), or set data.root to a folder holding "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte"
            "[.gz] and t10k-labels-idx1-ubyte[.gz]"
        )
    return folder


def read_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of a split ("train" or "test")."""
    images_name, labels_name = FILES[split]
    with _open(folder, images_name) as f:
        data = f.read()
    magic, n, rows, cols = np.frombuffer(data[:16], dtype=">i4")
    if magic != 2051:
        raise ConfigError(f"{folder}/{images_name}: not an idx image file (magic {magic})")
    images = np.frombuffer(data[16:], dtype=np.uint8).reshape(n, rows, cols)
    with _open(folder, labels_name) as f:
        data = f.read()
    magic, m = np.frombuffer(data[:8], dtype=">i4")
    if magic != 2049 or m != n:
        raise ConfigError(f"{folder}/{labels_name}: not the labels of {images_name}")
    return images, np.frombuffer(data[8:], dtype=np.uint8).astype(np.int64)


class FashionMNIST(Dataset):
    """One split as RGB PIL images (grey repeated) and labels.

    Indexing applies ``transform``; :meth:`load` gives the raw image, which makes the split an
    image source for the seeded, resumable training set (:class:`lmim.data.images.TrainSet`).

    Args:
        root: folder of the idx files (None = the Debian package's).
        split: "train" or "test".
        transform: PIL image -> model input (None for :meth:`load` only).
        limit: keep only the first ``limit`` images (None = all).
    """

    def __init__(self, root: str | None, split: str, transform=None, limit: int | None = None):
        self.images, self.labels = read_idx(find_root(root), split)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.load(index)
        return self.transform(img), label


class FashionMNISTDataModule(_PretrainDataModule):
    """Fashion-MNIST for pre-training (train split, augmented) and evaluation (both splits,
    deterministic, with labels). Grey images are served as 3 channels at ``img_size``.

    Args:
        root: folder of the idx files; None reads the Debian package.
        train_limit: use only the first N training images (None = 60,000).
        test_limit: use only the first N test images (None = 10,000).
        **kwargs: loader and augmentation settings of the base class (``img_size``, crop scale,
            ``batch_size``, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        train_limit: int | None = None,
        test_limit: int | None = None,
        mean: Sequence[float] = FMNIST_MEAN,
        std: Sequence[float] = FMNIST_STD,
        **kwargs,
    ) -> None:
        super().__init__(mean=mean, std=std, **kwargs)
        self.root = root
        self.num_classes = len(CLASSES)
        self.train_limit = train_limit
        self.test_limit = test_limit

    def validate(self) -> None:
        find_root(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            source = FashionMNIST(self.root, "train", None, self.train_limit)
            self.train_set = TrainSet(source, self.train_transform(), seed=0)

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def labelled_dataset(self, split: str, transform, limit: int | None = None) -> FashionMNIST:
        """The "train" split (60,000) or the test split ("val" or "test", 10,000) through
        ``transform``; ``limit`` (default ``data.train_limit`` / ``data.test_limit``) keeps the
        first images."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train' or 'val' (or 'test'), got {split!r}")
        split = "train" if split == "train" else "test"
        if limit is None:
            limit = self.train_limit if split == "train" else self.test_limit
        return FashionMNIST(self.root, split, transform, limit)

    def eval_dataset(self, split: str, limit: int | None = None) -> FashionMNIST:
        """A deterministic labelled split ("train" or "test") for kNN, probes and fine-tuning."""
        return self.labelled_dataset(split, self.eval_view(), limit)

    def preview_images(self, n: int) -> torch.Tensor:
        ds = FashionMNIST(self.root, "test", self.preview_transform(), self.test_limit)
        picks, seen = [], set()
        for i, label in enumerate(ds.labels):
            if int(label) not in seen:
                seen.add(int(label))
                picks.append(i)
            if len(picks) == n:
                break
        return torch.stack([ds[i][0] for i in picks])
