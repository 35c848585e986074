"""Lightning DataModules: any ImageFolder tree (ImageNet layout) and the embedded demo photos."""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lmim.data.images import ImageFiles, TrainSet, UnreadableImageError, collate, load_rgb
from lmim.data.resumable import ResumableLoader, ResumableSampler
from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform
from lmim.errors import ConfigError


class _PretrainDataModule(L.LightningDataModule):
    """Shared loader settings. ``batch_size`` is per device; the global batch is
    ``batch_size x devices x nodes x accumulate_grad_batches``.

    The data order is a (seed, epoch) permutation split across processes like torch's
    ``DistributedSampler`` (also with one process), and every sample's augmentation is seeded by
    (seed, epoch, index): N processes see the global batches one process sees, and a resumed run
    continues the interrupted epoch where it stopped (:mod:`lmim.data.resumable`).

    Args:
        img_size: crop side in pixels.
        batch_size: images per device.
        num_workers: loader worker processes.
        crop_scale: RandomResizedCrop area range.
        hflip: horizontal flip probability.
        mean: normalisation mean.
        std: normalisation std.
        pin_memory: pin batches (on a GPU machine).
        drop_last: drop each epoch's incomplete batch.
        seed: shuffling and augmentation seed (the run's ``seed``); None draws one per run.
        max_skipped_share: stop when more than this share of the images is unreadable.
    """

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
        seed: int | None = 0,
        max_skipped_share: float = 0.01,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1 (images per device)")
        if not 0.0 <= float(max_skipped_share) <= 1.0:
            raise ConfigError(
                f"data.max_skipped_share={max_skipped_share} must lie in [0, 1] (the share of "
                "unreadable images tolerated), e.g. data.max_skipped_share=0.01"
            )
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.seed = seed
        self.max_skipped_share = float(max_skipped_share)
        self.train_set: TrainSet | None = None
        self.loader: ResumableLoader | None = None
        self._loader_state: dict[str, int] | None = None

    def _run_seed(self) -> int:
        """The seed, drawn once per run (on rank 0, shared with every process) when None."""
        if self.seed is None:
            seed = secrets.randbits(62)
            trainer = self.trainer
            self.seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed
        return int(self.seed)

    def train_transform(self):
        return pretrain_transform(self.img_size, self.crop_scale, self.hflip, self.mean, self.std)

    def preview_transform(self):
        return eval_transform(self.img_size, self.mean, self.std)

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the data cannot be read; called before training."""

    def check_size(self, world_size: int) -> None:
        """Raise :class:`ConfigError` unless every one of ``world_size`` processes gets a batch."""
        if self.train_set is None:
            self.setup("fit")
        n = len(self.train_set)
        if self.drop_last and math.ceil(n / world_size) < self.batch_size:
            procs = f" x {world_size} processes (trainer.devices x trainer.num_nodes)"
            raise ConfigError(
                f"the training set has {n} images, fewer than one batch per process "
                f"(data.batch_size={self.batch_size}{procs if world_size > 1 else ''}): lower "
                f"data.batch_size{' or trainer.devices' if world_size > 1 else ''}, or add images"
            )

    def train_dataloader(self) -> ResumableLoader:
        if self.train_set is None:
            self.setup("fit")
        trainer = self.trainer
        dist = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        world, rank = int(dist.get("num_replicas", 1)), int(dist.get("rank", 0))
        self.check_size(world)
        self.train_set.seed = self._run_seed()
        sampler = ResumableSampler(self.train_set, world, rank, seed=self.train_set.seed)
        self.loader = ResumableLoader(
            self.train_set,
            sampler=sampler,
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)
            self._loader_state = None
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        """The seed and the loader's position, saved in checkpoints by Lightning.

        Lightning also saves the position through the loader's own ``state_dict``, but skips
        restoring it when the loader was built before the checkpoint was restored (the lr
        schedule's ``estimated_stepping_batches`` builds it in ``configure_optimizers``); the
        DataModule's state is restored before that.
        """
        state: dict[str, Any] = {"seed": self.seed}
        if self.loader is not None:
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
            if self.loader is not None:  # built before the restore (e.g. under FSDP)
                self.loader.sampler.seed = self.train_set.seed = self.seed
        if "loader" in state_dict:
            if self.loader is not None:
                self.loader.load_state_dict(state_dict["loader"])
            else:
                self._loader_state = dict(state_dict["loader"])


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
            # torchvision's scan (classes, extensions); decoding is lmim's (load_rgb).
            files = ImageFolder(str(self.split_dir), loader=lambda p: p).samples
            self.train_set = TrainSet(ImageFiles(files), self.train_transform(), seed=0)

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic normalised views of the first readable images of distinct
        classes."""
        if self.train_set is None:
            self.setup("fit")
        tf = self.preview_transform()
        views: list[torch.Tensor] = []
        used: set[str] = set()
        for distinct_classes in (True, False):
            seen: set[int] = set()
            for path, label in self.train_set.source.samples:
                if len(views) == n:
                    return torch.stack(views)
                if path in used or (distinct_classes and label in seen):
                    continue
                seen.add(label)
                used.add(path)
                try:
                    views.append(tf(load_rgb(path)))
                except UnreadableImageError:
                    continue
        return torch.stack(views)


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
    """An epoch of ``length`` samples cycling over a few photos; label = photo index. Wrapped in
    a :class:`lmim.data.images.TrainSet`, each sample is a random augmented view."""

    def __init__(self, images: Sequence[Image.Image], length: int) -> None:
        self.images = list(images)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[Image.Image, int]:
        label = index % len(self.images)
        return self.images[label], label


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
            crops = RandomCrops(self.photos(), self.samples_per_epoch)
            self.train_set = TrainSet(crops, self.train_transform(), seed=0)

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic centre views of the first n photos."""
        tf = self.preview_transform()
        return torch.stack([tf(img) for img in self.photos()[:n]])
