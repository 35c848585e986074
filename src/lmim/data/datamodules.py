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
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import RandomResizedCrop

from lmim.data.dali import EncodedBatch
from lmim.data.decode import DRAFT_MARGIN, CropDecode, normalize_uint8
from lmim.data.images import (
    ImageFiles,
    LabelledImages,
    TrainSet,
    UnreadableImageError,
    collate,
    load_rgb,
)
from lmim.data.resumable import ResumableLoader, ResumableSampler
from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform
from lmim.errors import ConfigError
from lmim.seeding import AUGMENT, derive_seed

# data.pipeline: how training views are made (see _PretrainDataModule).
PIPELINES = ("fast", "pil", "dali")


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
        eval_crop_pct: the evaluation view (k-NN, linear probe) resizes to
            ``img_size / eval_crop_pct`` and centre-crops ``img_size``.
        pipeline: how training views are made. ``pil``: torchvision's transforms on decoded
            PIL images, normalised floats from the workers. ``fast``: the crop drawn before
            decoding, JPEGs decoded by libjpeg-turbo (at reduced scale when the crop allows),
            torch's uint8 bicubic resize, uint8 batches normalised on the device
            (:mod:`lmim.data.decode`). ``dali``: workers read files and draw the crops, DALI
            decodes the crop regions on the GPU (:mod:`lmim.data.dali`). All three draw the
            same crop boxes and flips.
        draft_margin: ``fast`` decodes a JPEG at 1/2, 1/4 or 1/8 scale when the reduced crop
            is still this many times ``img_size``; 0 decodes every image at full scale.

    Labelled DataModules (all of lmim's) also give deterministic labelled splits for
    evaluation: ``num_classes``, ``classes``, :meth:`labelled_dataset` and :meth:`eval_dataset`
    (splits ``"train"`` and ``"val"``; ``"test"`` is the same as ``"val"``).
    """

    num_classes: int | None = None

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
        eval_crop_pct: float = 1.0,
        pipeline: str = "pil",
        draft_margin: float = DRAFT_MARGIN,
    ) -> None:
        super().__init__()
        if pipeline not in PIPELINES:
            raise ConfigError(
                f"data.pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}: fast (crop "
                "before decode, uint8 batches normalised on the device), pil (torchvision's "
                "transforms on PIL images) or dali (decoded on the GPU by NVIDIA DALI)"
            )
        self.pipeline = pipeline
        if float(draft_margin) < 0:
            raise ConfigError(
                f"data.draft_margin={draft_margin} must be >= 0 (0: no reduced-scale decoding)"
            )
        self.draft_margin = float(draft_margin)
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
        if not 0.0 < float(eval_crop_pct) <= 1.0:
            raise ConfigError(
                f"data.eval_crop_pct={eval_crop_pct} must lie in (0, 1] (0.875: resize 256, "
                "centre crop 224)"
            )
        self.eval_crop_pct = float(eval_crop_pct)
        self.train_set: TrainSet | None = None
        self.loader: ResumableLoader | None = None
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loader_state: dict[str, int] | None = None

    def _run_seed(self) -> int:
        """The seed, drawn once per run (on rank 0, shared with every process) when None."""
        if self.seed is None:
            seed = secrets.randbits(62)
            trainer = self.trainer
            self.seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed
        return int(self.seed)

    def train_transform(self):
        if self.pipeline == "dali":
            from lmim.data.dali import CropPlan, require_dali

            require_dali()
            return CropPlan(self.img_size, self.crop_scale, self.hflip)
        if self.pipeline == "fast":
            return CropDecode(
                self.img_size, self.crop_scale, self.hflip, draft_margin=self.draft_margin
            )
        return pretrain_transform(self.img_size, self.crop_scale, self.hflip, self.mean, self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A training batch as the model takes it: uint8 batches (``pipeline=fast``) are
        normalised here, on their device; float batches are already normalised."""
        if images.dtype == torch.uint8:
            # The constants are made once per device, not copied to it every step.
            stats = self._stats.get(images.device)
            if stats is None:
                stats = self._stats[images.device] = tuple(
                    torch.tensor(v, dtype=torch.float32, device=images.device)
                    for v in (self.mean, self.std)
                )
            return normalize_uint8(images, *stats)
        return images

    def decode_on_device(self, batch: Any, device: torch.device) -> torch.Tensor:
        """uint8 views of an undecoded batch (``pipeline=dali``) on ``device``; files that
        fail to decode are replaced and handed to the loader's skipped list."""
        from lmim.data.dali import DaliDecoder

        decoder = getattr(self, "_dali", None)
        if decoder is None or decoder.device != device:
            decoder = self._dali = DaliDecoder(self.img_size, self.batch_size, device)
        images, skipped = decoder(batch)
        if skipped and self.loader is not None:
            self.loader.add_skipped(skipped)
        return images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook after a batch reached the device: decode an undecoded batch there
        (DALI), normalise uint8 images."""
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], EncodedBatch):
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            batch = type(batch)([self.decode_on_device(batch[0], device), *batch[1:]])
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return type(batch)([self.normalize(batch[0]), *batch[1:]])
        if isinstance(batch, torch.Tensor):
            return self.normalize(batch)
        return batch

    def preview_transform(self):
        return eval_transform(self.img_size, self.mean, self.std)

    def eval_view(self):
        """The deterministic evaluation view (``eval_crop_pct``)."""
        return eval_transform(self.img_size, self.mean, self.std, self.eval_crop_pct)

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the data cannot be read; called before training."""

    def validate_labelled(self) -> None:
        """Raise :class:`ConfigError` unless both labelled splits can be read; called before
        an evaluation."""
        self.validate()

    def labelled_dataset(self, split: str, transform, limit: int | None = None) -> Dataset:
        """``(image, label)`` pairs of ``split`` ("train" or "val") through ``transform``, in a
        fixed order; ``limit`` keeps that many, spread evenly over the split."""
        raise ConfigError(f"{type(self).__name__} has no labels")

    def eval_dataset(self, split: str, limit: int | None = None) -> Dataset:
        """A labelled split in the evaluation view (k-NN monitor, linear probe)."""
        return self.labelled_dataset(split, self.eval_view(), limit)

    def eval_dataloader(self, split: str, limit: int | None = None) -> DataLoader:
        return DataLoader(
            self.eval_dataset(split, limit),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

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

    def _collate(self):
        if self.pipeline == "dali":
            from lmim.data.dali import collate_encoded

            return collate_encoded
        return collate

    def make_sampler(self, world: int, rank: int, seed: int) -> ResumableSampler:
        """The training order of process ``rank`` of ``world`` (a (seed, epoch) permutation)."""
        return ResumableSampler(self.train_set, world, rank, seed=seed)

    def train_dataloader(self) -> ResumableLoader:
        if self.train_set is None:
            self.setup("fit")
        trainer = self.trainer
        dist = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        world, rank = int(dist.get("num_replicas", 1)), int(dist.get("rank", 0))
        self.check_size(world)
        self.train_set.seed = self._run_seed()
        sampler = self.make_sampler(world, rank, self.train_set.seed)
        self.loader = ResumableLoader(
            self.train_set,
            sampler=sampler,
            batch_size=self.batch_size,
            collate_fn=self._collate(),
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


def _split_name(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train' or 'val' (or 'test'), got {split!r}")
    return "val" if split == "test" else split


def spread(dataset: Dataset, limit: int | None) -> Dataset:
    """``limit`` items of ``dataset`` at evenly spaced indices (every class of a sorted
    ImageFolder keeps its share), or the whole dataset."""
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    return Subset(dataset, [i * n // limit for i in range(max(int(limit), 0))])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _holds_images(folder: str) -> bool:
    """True as soon as one image file is found below ``folder``."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(_is_image(f) for f in files):
            return True
    return False


def class_folders(split_dir: Path, root: Any) -> list[str]:
    """The class folders of an ImageFolder split, checked: raises :class:`ConfigError` when the
    images lie directly in the split folder, when there are none, or when a class folder holds
    none (what torchvision's scan refuses with a ``FileNotFoundError``)."""
    entries = list(os.scandir(split_dir))
    classes = sorted(e.name for e in entries if e.is_dir(follow_symlinks=True))
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    filled = [c for c in classes if _holds_images(os.path.join(split_dir, c))]
    layout = f"expected {split_dir}/<class>/<images>"
    if not filled and loose:
        raise ConfigError(
            f"data.root={root}: the {len(loose)} images of {split_dir} lie directly in it, but "
            f"an ImageFolder reads one folder per class ({layout}): move them into class "
            f"folders (for pre-training any one folder works, e.g. {split_dir}/all/)"
        )
    if not filled:
        raise ConfigError(
            f"data.root={root}: {split_dir} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, "
            f"...) in class sub-folders: {layout}"
        )
    empty = [c for c in classes if c not in filled]
    if empty:
        raise ConfigError(
            f"data.root={root}: {len(empty)} class folder(s) of {split_dir} hold no images "
            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}): remove them or add "
            "images (every folder is a class)"
        )
    return classes


class ImageFolderDataModule(_PretrainDataModule):
    """Images under ``root/<split>/<class>/*`` (the ImageNet layout).

    Pre-training reads ``root/<split>`` and ignores the labels; evaluation (linear probe,
    fine-tuning, k-NN monitor) reads ``root/<split>`` and ``root/<val_split>``, with labels from
    the class folders, which must be the same in both.

    Args:
        root: dataset root holding ``split`` (and ``val_split`` for evaluation).
        split: sub-folder read for pre-training and as the labelled training split (``train``).
        val_split: sub-folder of the labelled validation split (``val``).
        **kwargs: loader and augmentation settings of the base class (``eval_crop_pct``
            defaults to 0.875 here).
    """

    def __init__(
        self, root: str | None = None, split: str = "train", val_split: str = "val", **kwargs
    ) -> None:
        kwargs.setdefault("eval_crop_pct", 0.875)  # the paper's view: resize 256, crop 224
        super().__init__(**kwargs)
        self.root = root
        self.split = split
        self.val_split = val_split
        self._classes: list[str] | None = None

    @property
    def root_dir(self) -> Path:
        return Path(os.path.expanduser(str(self.root)))

    @property
    def split_dir(self) -> Path:
        return self.root_dir / self.split

    def validate(self) -> None:
        if self.root in (None, "", "???"):
            raise ConfigError(
                "data.root is not set: pass data.root=/path/to/imagenet (a folder holding "
                f"{self.split}/<class>/<images>), or use data=demo for the embedded photos"
            )
        root = self.root_dir
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
        self._classes = class_folders(split, self.root)

    def validate_labelled(self) -> None:
        self.validate()
        val = self.root_dir / self.val_split
        if not val.is_dir():
            raise ConfigError(
                f"data.root={self.root} has no '{self.val_split}' folder, which linear probing "
                f"and fine-tuning evaluate on: add {val}/<class>/<images> with the class folders "
                f"of {self.split}/ (or set data.val_split to the validation folder's name)"
            )
        train, held = set(self.classes), set(class_folders(val, self.root))
        if train != held:
            only_train, only_val = sorted(train - held), sorted(held - train)
            raise ConfigError(
                f"data.root={self.root}: the class folders of {self.split}/ and "
                f"{self.val_split}/ differ ({len(only_train)} only in {self.split}/"
                f"{': ' + ', '.join(only_train[:3]) if only_train else ''}; {len(only_val)} only "
                f"in {self.val_split}/{': ' + ', '.join(only_val[:3]) if only_val else ''}): "
                "labels are the folder names, so both splits need the same class folders"
            )

    @property
    def classes(self) -> list[str]:
        """The class folder names of the training split, sorted (label = position)."""
        if self._classes is None:
            self.validate()
        return list(self._classes)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def _samples(self, split: str) -> list[tuple[str, int]]:
        """``(path, label)`` of a split, by torchvision's scan, with the training split's labels."""
        folder = self.root_dir / (self.split if split == "train" else self.val_split)
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.validate()
            # torchvision's scan (classes, extensions); decoding is lmim's (load_rgb).
            files = ImageFolder(str(self.split_dir), loader=lambda p: p).samples
            source = ImageFiles(files, encoded=self.pipeline in ("fast", "dali"))
            self.train_set = TrainSet(source, self.train_transform(), seed=0)

    def labelled_dataset(self, split: str, transform, limit: int | None = None) -> Dataset:
        split = _split_name(split)
        if split == "val":
            self.validate_labelled()
        return spread(LabelledImages(ImageFiles(self._samples(split)), transform), limit)

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


class FixedCrops:
    """A fixed labelled set of crops of a few photos: crop ``i`` comes from photo
    ``i % len(photos)`` (its label), with an area share in ``scale`` and a position drawn from
    (``seed``, ``i``), the same every time. An image source for :class:`LabelledImages`."""

    def __init__(
        self, images: Sequence[Image.Image], length: int, scale: Sequence[float], seed: int
    ) -> None:
        self.images, self.length = list(images), int(length)
        self.scale, self.seed = tuple(scale), int(seed)

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[Image.Image, int]:
        label = index % len(self.images)
        img = self.images[label]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, AUGMENT, 0, index))
            top, left, h, w = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        return img.crop((left, top, left + w, top + h)), label


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

    @property
    def classes(self) -> list[str]:
        """The photos' names: a crop's label is the photo it was cut from."""
        return list(self.images)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.images)

    def labelled_dataset(self, split: str, transform, limit: int | None = None) -> Dataset:
        """Fixed crops labelled with their photo (:class:`FixedCrops`): ``samples_per_epoch``
        for "train", a quarter as many (at least one per photo) other crops for "val"."""
        split = _split_name(split)
        train = split == "train"
        n = self.samples_per_epoch if train else max(len(self.images), self.samples_per_epoch // 4)
        crops = FixedCrops(self.photos(), n, self.crop_scale, seed=0 if train else 1)
        return spread(LabelledImages(crops, transform), limit)

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic centre views of the first n photos."""
        tf = self.preview_transform()
        return torch.stack([tf(img) for img in self.photos()[:n]])


class ResidentBatches:
    """``length`` steps of one batch that stays on the device: the loader costs nothing."""

    def __init__(self, batch: torch.Tensor, length: int) -> None:
        self.batch, self.length = batch, int(length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.batch


class ResidentDataModule(DemoDataModule):
    """One batch of real training views (the demo photos' augmented crops, as uint8 with the
    default ``pipeline=fast``) made once, copied to the training device once and served every
    step: the training step, Lightning's loop and the callbacks without any loader cost, for
    throughput benchmarks (``data=resident``). Evaluation and previews are the demo's.

    Args:
        samples_per_epoch: images per epoch (steps = samples_per_epoch // batch_size).
        **kwargs: the demo's settings (``images``, ``img_size``, ``batch_size``, ...).
    """

    def train_dataloader(self) -> ResidentBatches:
        if self.train_set is None:
            self.setup("fit")
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        self.train_set.seed = self._run_seed()
        # TrainSet items are (view, label, skipped files)
        batch = torch.stack([self.train_set[i][0] for i in range(self.batch_size)])
        steps = max(1, self.samples_per_epoch // self.batch_size)
        return ResidentBatches(batch.to(device), steps)
