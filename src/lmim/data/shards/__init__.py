"""Streaming shards: an ImageFolder written once into LitData chunks, read from a local folder
or object storage (``s3://``, ``gs://``...) instead of millions of small files.

Write (``conf/shards.yaml``)::

    python -m lmim.data.shards write data.root=/data/imagenet out=/data/imagenet-shards

Train::

    python -m lmim.train data=shards data.path=/data/imagenet-shards   # or s3://bucket/prefix

Why LitData (``litdata.optimize``, Lightning's streaming format) and not WebDataset: it has an
index, so records are addressed by number; on one core it yields the records of a chunk at about
75,000/s against WebDataset's 4,400-5,900 tar records/s, a cost that would otherwise be a tenth
of the loader's time (docs/benchmarks.md); and it reads ``s3://`` and other object stores with a
local chunk cache.

Each record is ``{"image": the file's bytes, "label": class index, "path": its path below the
split}``: the JPEG is stored as it was, not re-encoded, and decoded by the training pipeline
(``data.pipeline``, :mod:`lmim.data.decode`), so shards and folders give the same pixels. The
writer shuffles the files once (``seed``), so every chunk is a random sample of the dataset.

Reading keeps every guarantee of :class:`lmim.data.ImageFolderDataModule`: one (seed, epoch)
order for any number of processes, split like torch's ``DistributedSampler``; mid-epoch resume;
per-sample (seed, epoch, index) augmentation; unreadable records replaced, reported and counted
(``data/skipped``). For locality the order visits the chunks in a random order and the records
of each chunk in a random order (:class:`ChunkedSampler`): all processes read the same chunk at
a time, so each node reads every chunk once per epoch (into LitData's cache for remote paths).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from lmim.data.datamodules import (
    ImageFolderDataModule,
    _PretrainDataModule,
    _split_name,
    spread,
)
from lmim.data.images import (
    EncodedImage,
    LabelledImages,
    TrainSet,
    UnreadableImageError,
    error_reason,
)
from lmim.data.resumable import ResumableSampler
from lmim.errors import ConfigError

INDEX = "index.json"
# Written next to LitData's index: the class names and where the shards came from.
META = "lmim_shards.json"
REMOTE = ("s3://", "gs://", "gcs://", "azure://", "az://", "hf://", "r2://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE)


# ---- reading --------------------------------------------------------------------------------


def read_index(path: str) -> dict[str, Any]:
    """LitData's ``index.json`` of a local shard folder, checked: raises :class:`ConfigError`
    for a missing folder, an empty one, a truncated index, and missing or truncated chunks."""
    folder = Path(os.path.expanduser(path))
    hint = "write them with `python -m lmim.data.shards write data.root=<ImageFolder> out=<folder>`"
    if not folder.is_dir():
        raise ConfigError(f"data.path={path} does not exist: point it at a shard folder ({hint})")
    index = folder / INDEX
    if not index.is_file():
        what = "is empty" if not any(folder.iterdir()) else f"has no {INDEX}"
        raise ConfigError(f"data.path={path} {what}: it holds no LitData shards; {hint}")
    try:
        meta = json.loads(index.read_text())
        chunks = meta["chunks"]
        sizes = [int(c["chunk_size"]) for c in chunks]
        files = [(str(c["filename"]), int(c["chunk_bytes"])) for c in chunks]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"data.path={path}: {index} is truncated or not a LitData index "
            f"({type(err).__name__}); rewrite the shards ({hint})"
        ) from err
    if not sizes or sum(sizes) == 0:
        raise ConfigError(f"data.path={path}: {index} lists no records; {hint}")
    for name, nbytes in files:
        chunk = folder / name
        if not chunk.is_file():
            raise ConfigError(
                f"data.path={path}: shard {name}, listed in {INDEX}, is missing: copy it back or "
                f"rewrite the shards ({hint})"
            )
        if chunk.stat().st_size < nbytes:
            raise ConfigError(
                f"data.path={path}: shard {name} is truncated ({chunk.stat().st_size} of its "
                f"{nbytes} bytes): copy it again or rewrite the shards ({hint})"
            )
    return meta


def check_credentials(path: str) -> None:
    """Raise :class:`ConfigError` for an ``s3://`` path when no AWS credentials can be found
    (environment, profile, instance role), before LitData tries to read it."""
    if not str(path).startswith("s3://"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise ConfigError(
            f"data.path={path}: no credentials for s3:// were found. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; AWS_ENDPOINT_URL for another S3 server) in "
            "the environment of every process, or copy the shards to a local folder and pass "
            "that"
        )


def open_streaming(path: str, cache_dir: str | None = None):
    """``litdata.StreamingDataset`` of ``path``, with one-line errors for what users meet:
    an object-store path without credentials or that cannot be reached."""
    import litdata

    try:
        # batch_decode=False: LitData would otherwise deserialise a window of ~250 records
        # around every record read out of order (5x slower reads in the chunk-local order).
        return litdata.StreamingDataset(path, cache_dir=cache_dir, batch_decode=False)
    except Exception as err:
        name = type(err).__name__
        text = f"{name}: {err}"
        if is_remote(path):
            creds = "credential" in text.lower() or "NoCredentials" in name
            why = "no credentials were found" if creds else f"it could not be read ({text[:200]})"
            raise ConfigError(
                f"data.path={path}: {why}. Give the object store's credentials in the "
                "environment (for s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE; AWS_ENDPOINT_URL for another S3 server), or copy the shards to a "
                "local folder and pass that"
            ) from err
        raise ConfigError(f"data.path={path}: LitData cannot read these shards ({text})") from err


def chunk_sizes(dataset) -> list[int]:
    """Records per chunk of a ``litdata.StreamingDataset``, in its index order. (Their sum is
    the number of records; under torch.distributed, ``len(dataset)`` is LitData's share of one
    process, while records are read here by their global index.)"""
    return [int(end) - int(start) for start, end in dataset.region_of_interest]


class ShardRecords:
    """The records of a shard folder as an image source (:class:`lmim.data.images.TrainSet`):
    ``load(i)`` gives the record's image undecoded (:class:`EncodedImage`) and its label.

    The LitData dataset is opened in each process that reads (loader workers included).

    Args:
        path: the shard folder or object-store prefix.
        length: records in it.
        cache_dir: LitData's chunk cache for remote paths (None: its default).
        decoded: give decoded RGB images instead (``data.pipeline=pil``).
    """

    def __init__(
        self, path: str, length: int, cache_dir: str | None = None, decoded: bool = False
    ) -> None:
        self.path, self.length, self.cache_dir, self.decoded = (
            str(path),
            int(length),
            cache_dir,
            decoded,
        )
        self._dataset = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_pid": None}

    def __len__(self) -> int:
        return self.length

    def dataset(self):
        if self._dataset is None or self._pid != os.getpid():
            self._dataset = open_streaming(self.path, self.cache_dir)
            self._pid = os.getpid()
        return self._dataset

    def load(self, index: int):
        name = f"{self.path} record {index}"
        try:
            record = self.dataset()[int(index)]
            image = EncodedImage(f"{name} ({record.get('path', '?')})", bytes(record["image"]))
            label = int(record["label"])
        except ConfigError:
            raise
        except Exception as err:  # a record LitData cannot read: skipped like a bad file
            raise UnreadableImageError(name, error_reason(err)) from err
        return (image.decode() if self.decoded else image), label


class ChunkedSampler(ResumableSampler):
    """:class:`ResumableSampler` whose (seed, epoch) order visits the chunks in a random order
    and the records of each chunk in a random order, so that reading stays within one chunk at
    a time; split across processes and resumed exactly as the parent.

    Args:
        dataset: the training set (its length is the records' count).
        sizes: records per chunk, in index order.
        num_replicas, rank, seed, shuffle: as for :class:`ResumableSampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        sizes: Sequence[int],
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle)
        self.sizes = [int(s) for s in sizes]
        if sum(self.sizes) != len(dataset):
            raise ValueError(f"chunk sizes sum to {sum(self.sizes)}, not {len(dataset)} records")

    def order(self) -> list[int]:
        """The whole epoch's order (before the split across processes)."""
        starts = [0]
        for s in self.sizes[:-1]:
            starts.append(starts[-1] + s)
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        out: list[int] = []
        for c in torch.randperm(len(self.sizes), generator=g).tolist():
            out.extend((starts[c] + torch.randperm(self.sizes[c], generator=g)).tolist())
        return out

    def indices(self) -> Iterator[int]:
        """This process's share of :meth:`order`, padded or cut like ``DistributedSampler``."""
        order = self.order()
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            order += (order * (pad // max(len(order), 1) + 1))[:pad]
        return iter(order[self.rank : self.total_size : self.num_replicas])


class ShardsDataModule(_PretrainDataModule):
    """Pre-training from LitData shards written by ``python -m lmim.data.shards write``.

    Args:
        path: the shard folder, or an object-store prefix (``s3://bucket/imagenet-shards``).
        cache_dir: where LitData keeps the chunks of a remote path (None: its default).
        **kwargs: loader and augmentation settings of the base class (``pipeline`` defaults to
            ``fast`` here).

    The labels written with the records make a labelled ``train`` split for the k-NN monitor
    and previews; probes and fine-tuning read a validation split from an ImageFolder
    (``data=imagefolder``).
    """

    def __init__(self, path: str | None = None, cache_dir: str | None = None, **kwargs) -> None:
        kwargs.setdefault("pipeline", "fast")
        kwargs.setdefault("eval_crop_pct", 0.875)
        super().__init__(**kwargs)
        self.path = path
        self.cache_dir = cache_dir
        self._sizes: list[int] | None = None
        self._meta: dict[str, Any] | None = None

    def _path(self) -> str:
        if self.path in (None, "", "???"):
            raise ConfigError(
                "data.path is not set: pass data.path=/path/to/shards (or s3://bucket/prefix), "
                "written by `python -m lmim.data.shards write data.root=<ImageFolder> "
                "out=<folder>`"
            )
        path = str(self.path)
        return path if is_remote(path) else os.path.expanduser(path)

    def validate(self) -> None:
        path = self._path()
        if is_remote(path):
            check_credentials(path)
        else:
            read_index(path)
            meta = Path(path) / META
            self._meta = json.loads(meta.read_text()) if meta.is_file() else {}

    def _open(self):
        self.validate()
        dataset = open_streaming(self._path(), self.cache_dir)
        self._sizes = chunk_sizes(dataset)
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._open()
            source = ShardRecords(
                self._path(), sum(self._sizes), self.cache_dir, decoded=self.pipeline == "pil"
            )
            self.train_set = TrainSet(source, self.train_transform(), seed=0)

    def make_sampler(self, world: int, rank: int, seed: int) -> ChunkedSampler:
        return ChunkedSampler(self.train_set, self._sizes, world, rank, seed=seed)

    @property
    def classes(self) -> list[str]:
        """The class names written with the shards (local paths), else ``0, 1, ...``."""
        if self._meta is None:
            self.validate()
        names = (self._meta or {}).get("classes")
        if names:
            return list(names)
        raise ConfigError(
            f"data.path={self.path}: the class names ({META}) are not there; probes and the "
            "k-NN monitor need them: evaluate with data=imagefolder"
        )

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def labelled_dataset(self, split: str, transform, limit: int | None = None) -> Dataset:
        if _split_name(split) != "train":
            raise ConfigError(
                "data=shards holds the training split only; linear probing and fine-tuning "
                "read a validation split: use data=imagefolder data.root=<ImageFolder with val/>"
            )
        self.classes  # noqa: B018 (checked)
        self._open()
        n = sum(self._sizes)
        source = ShardRecords(self._path(), n, self.cache_dir, decoded=True)
        return spread(LabelledImages(source, transform), limit)

    def preview_images(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) deterministic views of the first readable records."""
        if self.train_set is None:
            self.setup("fit")
        source: ShardRecords = self.train_set.source
        tf = self.preview_transform()
        views = []
        for i in range(len(source)):
            if len(views) == n:
                break
            try:
                image, _ = source.load(i)
                views.append(tf(image if isinstance(image, Image.Image) else image.decode()))
            except UnreadableImageError:
                continue
        return torch.stack(views)


# ---- writing --------------------------------------------------------------------------------


def _record(item: tuple[str, int, str]) -> dict[str, Any]:
    path, label, rel = item
    return {"image": Path(path).read_bytes(), "label": int(label), "path": rel}


def _readable(path: str) -> str | None:
    """None if ``path`` opens as an image (its header), else why not."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 (the header is read)
        return None
    except Exception as err:
        return error_reason(err)


def write_shards(
    root: str,
    out: str,
    split: str = "train",
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write ``root/<split>/<class>/*`` into LitData shards in ``out``; returns the summary
    written to ``out/lmim_shards.json``.

    Files whose header does not open as an image are left out and listed in the summary;
    truncated images pass this check and are skipped when training reads them.

    Raises:
        ConfigError: the folder is not an ImageFolder split, or ``out`` already holds data.
    """
    import litdata

    dm = ImageFolderDataModule(root=root, split=split)
    classes = dm.classes  # checks the folder (ConfigError naming the fix)
    split_dir = dm.split_dir
    samples = dm._samples("train")
    target = Path(os.path.expanduser(out))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"out={out} already exists and is not empty: shards are written into a new folder "
            "(nothing there is overwritten); choose another out= or remove it yourself"
        )
    random.Random(seed).shuffle(samples)
    if limit is not None:
        samples = samples[: int(limit)]
    # Headers are checked by threads: on a shared filesystem the opens dominate, not the CPU.
    with ThreadPoolExecutor(max_workers=16) as pool:
        reasons = list(pool.map(_readable, [path for path, _ in samples]))
    bad = {
        os.path.relpath(path, split_dir): why
        for (path, _), why in zip(samples, reasons, strict=True)
        if why is not None
    }
    items = [
        (p, y, os.path.relpath(p, split_dir))
        for p, y in samples
        if os.path.relpath(p, split_dir) not in bad
    ]
    if not items:
        raise ConfigError(f"data.root={root}: none of the {len(samples)} files opens as an image")
    target.mkdir(parents=True, exist_ok=True)
    litdata.optimize(
        fn=_record,
        inputs=items,
        output_dir=str(target),
        chunk_bytes=chunk_bytes,
        num_workers=max(1, int(num_workers)),
        reorder_files=False,
        start_method="fork",
        verbose=True,
    )
    summary = {
        "source": str(split_dir),
        "records": len(items),
        "classes": classes,
        "seed": int(seed),
        "left_out": bad,
    }
    (target / META).write_text(json.dumps(summary, indent=1))
    return summary


def _write_task(cfg: DictConfig) -> None:
    from lmim.cli import fail

    try:
        _write(cfg)
    except ConfigError as err:
        fail(str(err))


def _write(cfg: DictConfig) -> None:
    from hydra.utils import to_absolute_path

    if cfg.out in (None, "", "???"):
        raise ConfigError("out is not set: pass out=/path/to/new/shard/folder")
    root = cfg.data.root
    if root in (None, "", "???"):
        raise ConfigError(
            "data.root is not set: pass data.root=/path/to/imagenet (a folder holding "
            f"{cfg.data.split}/<class>/<images>)"
        )
    out = to_absolute_path(str(cfg.out))
    summary = write_shards(
        to_absolute_path(str(root)),
        out,
        split=str(cfg.data.split),
        chunk_bytes=str(cfg.chunk_bytes),
        num_workers=int(cfg.num_workers),
        seed=int(cfg.seed),
        limit=cfg.limit,
    )
    left = summary["left_out"]
    print(
        f"wrote {summary['records']} records of {len(summary['classes'])} classes to {out}"
        + (
            f"; left out {len(left)} unreadable files, e.g. {next(iter(left.items()))}"
            if left
            else ""
        )
    )
    print(f"train on them with: python -m lmim.train data=shards data.path={out}")


def main() -> None:
    """``python -m lmim.data.shards write data.root=... out=...`` (Hydra overrides of
    ``conf/shards.yaml``)."""
    from lmim.cli import fail, hydra_entry

    args = sys.argv[1:]
    if not args or args[0] != "write":
        fail(
            "usage: python -m lmim.data.shards write data.root=/path/to/imagefolder "
            "out=/new/folder [data.split=train chunk_bytes=64MB num_workers=N seed=0 limit=N]"
        )
    sys.argv = [sys.argv[0], *args[1:]]
    hydra_entry("shards")(_write_task)()


__all__ = [
    "ChunkedSampler",
    "ShardsDataModule",
    "ShardRecords",
    "chunk_sizes",
    "open_streaming",
    "read_index",
    "write_shards",
]
