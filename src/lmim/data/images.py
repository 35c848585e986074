"""Reading training images robustly, and a training set with per-sample seeded augmentation.

Real image folders hold surprises: truncated downloads, HTML saved as ``.jpg``, CMYK JPEGs,
16-bit or palette PNGs with transparency, thumbnails smaller than the crop. :func:`load_rgb`
converts every readable mode to 8-bit RGB and raises :class:`UnreadableImageError` for the rest;
:class:`TrainSet` replaces an unreadable image by the next readable one and reports it, so a
run neither crashes nor silently trains on garbage.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from lmim.data.resumable import SampleKey
from lmim.errors import BadDataError
from lmim.seeding import AUGMENT, derive_seed

# Replacing a bad image gives up after this many unreadable ones in a row.
MAX_CONSECUTIVE_BAD = 64

log = logging.getLogger("lmim")


class UnreadableImageError(Exception):
    """A file that is not a decodable image.

    Args:
        path: the file.
        reason: why, in a few words (the decoder's error).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited over white; 16- and
    32-bit greyscale is scaled to 8 bits instead of clipped; CMYK, greyscale, palette and the
    rest use PIL's conversion.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")
    if img.mode == "I":
        # 16-bit data would clip to white in a plain conversion.
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def error_reason(err: Exception) -> str:
    """A decoder's error in a few words."""
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


def load_rgb(path: str | Path | io.BytesIO, name: str | None = None) -> Image.Image:
    """Decode an image file (or in-memory bytes, called ``name`` in errors) fully and convert it
    to RGB (:func:`to_rgb`).

    Raises:
        UnreadableImageError: the file is missing, truncated, not an image, or fails to decode.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as err:  # every decoder failure means the same: the file is unusable
        raise UnreadableImageError(str(name or path), error_reason(err)) from err


class EncodedImage:
    """An image not decoded yet: a file, or its bytes (a shard record).

    Args:
        name: what errors call it (the path, or ``shard:record``).
        data: the encoded bytes; None reads ``name`` as a file.
    """

    __slots__ = ("name", "_data")

    def __init__(self, name: str | Path, data: bytes | None = None) -> None:
        self.name = str(name)
        self._data = data

    def read(self) -> bytes:
        if self._data is not None:
            return self._data
        try:
            return Path(self.name).read_bytes()
        except OSError as err:
            raise UnreadableImageError(self.name, f"{type(err).__name__}: {err}") from err

    def decode(self) -> Image.Image:
        """The whole image as 8-bit RGB (:func:`load_rgb` of its bytes)."""
        return load_rgb(io.BytesIO(self.read()), self.name)


class ImageSource(Protocol):
    """What :class:`TrainSet` reads from: a length and ``load(i) -> (RGB image, label)``, which
    raises :class:`UnreadableImageError` for a bad file."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...


class ImageFiles:
    """Image files with labels, as listed by torchvision's ImageFolder scan.

    Args:
        samples: ``(path, label)`` pairs.
        encoded: ``load`` returns the file undecoded (:class:`EncodedImage`), for transforms
            that decode it themselves (:class:`lmim.data.decode.CropDecode`); otherwise the
            decoded RGB image.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], encoded: bool = False) -> None:
        self.samples = list(samples)
        self.encoded = bool(encoded)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image | EncodedImage, int]:
        path, label = self.samples[index]
        return (EncodedImage(path) if self.encoded else load_rgb(path)), label


class TrainSet(Dataset):
    """Augmented training samples whose randomness depends only on (seed, epoch, index).

    Indexed with :class:`SampleKey` (or a plain index, epoch 0). An unreadable image is replaced
    by the next readable one (index + 1, + 2, ...), so batches keep their size on every process,
    and reported with the sample.

    Args:
        source: the images (:class:`ImageSource`).
        transform: what ``source.load`` gives (a PIL image, or an :class:`EncodedImage`) ->
            tensor; its random draws use torch's default generator. It may raise
            :class:`UnreadableImageError` (a transform that decodes).
        seed: run seed.

    Returns (per item):
        ``(image tensor, label, skipped)``; ``skipped`` is a tuple of ``(path, reason)``.
    """

    def __init__(self, source: ImageSource, transform: Callable, seed: int) -> None:
        self.source = source
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, tuple]:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        skipped: list[tuple[str, str]] = []
        n = len(self.source)
        # Seed torch's default CPU generator (not torch.manual_seed, which would also reseed
        # CUDA) for this sample only; the process's own stream is restored afterwards. A
        # replacement image gets the draws of the sample it replaces.
        with torch.random.fork_rng(devices=[]):
            for attempt in range(min(MAX_CONSECUTIVE_BAD, n)):
                try:
                    img, label = self.source.load((index + attempt) % n)
                    torch.default_generator.manual_seed(
                        derive_seed(self.seed, AUGMENT, epoch, index)
                    )
                    image = self.transform(img)  # a transform that decodes may raise too
                    break
                except UnreadableImageError as err:
                    skipped.append((err.path, err.reason))
            else:
                listing = "; ".join(f"{p} ({r})" for p, r in skipped[:3])
                raise BadDataError(
                    f"{len(skipped)} images in a row could not be read, e.g. {listing}: check "
                    "data.root (is it the image folder?) and the files' integrity"
                )
        return image, label, tuple(skipped)


class LabelledImages(Dataset):
    """``(transform(image), label)`` of an image source, in its order: the deterministic
    labelled splits of evaluation (frozen features, linear probes, fine-tuning).

    An unreadable image is replaced by the next readable one (with that one's label) and named
    in a warning, as in pre-training.

    Args:
        source: the images (:class:`ImageSource`).
        transform: PIL image -> tensor.
    """

    def __init__(self, source: ImageSource, transform: Callable) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.source)
        if not 0 <= int(index) < n:  # ends plain iteration (replacements wrap around)
            raise IndexError(f"index {index} out of range for {n} images")
        for attempt in range(min(MAX_CONSECUTIVE_BAD, n)):
            try:
                img, label = self.source.load((int(index) + attempt) % n)
                break
            except UnreadableImageError as err:
                log.warning("evaluation: skipped unreadable image %s (%s)", err.path, err.reason)
        else:
            raise BadDataError(
                f"{MAX_CONSECUTIVE_BAD} images in a row could not be read from index {index}: "
                "check data.root (is it the image folder?) and the files' integrity"
            )
        return self.transform(img), label


def collate(samples: list[tuple[torch.Tensor, int, tuple]]) -> tuple[Any, Any, tuple]:
    """``(images, labels, skipped)``: the default collation of images and labels, and every
    sample's skipped files."""
    images, labels = default_collate([(s[0], s[1]) for s in samples])
    return images, labels, tuple(item for s in samples for item in s[2])
