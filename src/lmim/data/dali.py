"""``data.pipeline=dali`` (``data=imagefolder_dali``): JPEGs decoded on the GPU by NVIDIA DALI.

The loader workers only read each file, look at its header and draw the sample's crop box and
flip, exactly as the ``fast`` and ``pil`` pipelines do (:meth:`lmim.data.decode.CropDecode.params`
under the (seed, epoch, index) seed), so order, split across processes, mid-epoch resume and
augmentation stay what they are for the other pipelines. The batch of undecoded files reaches
the main process as an :class:`EncodedBatch`, and the DataModule's ``on_after_batch_transfer``
hands it to DALI on the process's GPU: ``fn.decoders.image_slice`` decodes only the crop's region
(nvJPEG; the hardware JPEG decoder where the GPU has one), ``fn.resize`` (cubic, antialiased)
makes it ``img_size``, ``fn.flip`` flips, and the uint8 batch is normalised on the device.

Without a GPU the same pipeline runs on the CPU (DALI's CPU operators): how the wiring is
tested on machines without one.

Unreadable files: a header that does not open, or a JPEG without its end-of-image marker (a
truncated download), is replaced in the worker by the next readable file, reported and counted
as in the other pipelines. A file that passes these checks but fails in DALI makes the whole
batch fall back to the CPU decode of :class:`CropDecode` for that batch, where the bad file is
replaced by another image of the batch and reported.

DALI is an optional dependency: ``pip install "lmim[dali]"`` (the CUDA 13 build; use
``nvidia-dali-cuda120`` for CUDA 12).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from lmim.data.decode import CropDecode, open_header
from lmim.data.images import EncodedImage, UnreadableImageError
from lmim.errors import ConfigError


class EncodedBatch:
    """A training batch before decoding: per image its file's bytes, crop box
    ``(top, left, h, w)`` in full-scale pixels, flip, and name. Not a tensor collection, so
    Lightning hands it over untouched."""

    __slots__ = ("data", "boxes", "flips", "names")

    def __init__(
        self,
        data: list[np.ndarray],
        boxes: np.ndarray,
        flips: np.ndarray,
        names: list[str],
    ) -> None:
        self.data, self.boxes, self.flips, self.names = data, boxes, flips, names

    def __len__(self) -> int:
        return len(self.data)


class CropPlan(CropDecode):
    """The worker's part: read the file and draw its crop and flip, decode nothing. Returns
    ``(bytes as uint8 array, (top, left, h, w), flip, name)``."""

    def __call__(self, img: EncodedImage | Image.Image):
        if isinstance(img, Image.Image):
            raise ConfigError(
                "data.pipeline=dali decodes files: it reads ImageFolder trees and shards "
                "(data=imagefolder_dali, data=shards data.pipeline=dali), not in-memory photos"
            )
        data = img.read()
        with open_header(img.name, data) as header:
            width, height = header.size
            kind = header.format
        if kind == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            raise UnreadableImageError(img.name, "truncated JPEG (no end-of-image marker)")
        top, left, h, w, flip = self.params(width, height)
        return np.frombuffer(data, dtype=np.uint8), (top, left, h, w), flip, img.name


def collate_encoded(samples: list[tuple[Any, int, tuple]]) -> tuple[EncodedBatch, Any, tuple]:
    """``(EncodedBatch, labels, skipped)`` from :class:`CropPlan` samples."""
    plans = [s[0] for s in samples]
    batch = EncodedBatch(
        data=[p[0] for p in plans],
        boxes=np.asarray([p[1] for p in plans], dtype=np.float32),
        flips=np.asarray([p[2] for p in plans], dtype=np.int32),
        names=[p[3] for p in plans],
    )
    labels = torch.as_tensor([s[1] for s in samples])
    return batch, labels, tuple(item for s in samples for item in s[2])


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "data.pipeline=dali needs NVIDIA DALI: pip install 'lmim[dali]' (CUDA 13; "
            "nvidia-dali-cuda120 for CUDA 12), or use data.pipeline=fast"
        ) from err


class DaliDecoder:
    """Decodes :class:`EncodedBatch` es to ``(B, 3, S, S)`` uint8 on ``device`` with one DALI
    pipeline (built on first use, for batches of up to ``max_batch``).

    Args:
        img_size: output side.
        max_batch: largest batch.
        device: a CUDA device (mixed decode, GPU resize) or the CPU (DALI's CPU operators).
        threads: DALI CPU threads.
    """

    def __init__(
        self, img_size: int, max_batch: int, device: torch.device, threads: int = 2
    ) -> None:
        require_dali()
        self.size, self.max_batch, self.device = int(img_size), int(max_batch), device
        self.threads = int(threads)
        self.fallback = CropDecode(img_size, draft_margin=0)
        self.fallbacks = 0  # batches decoded on the CPU because DALI failed on one of them
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=(self.device.index or 0) if gpu else None,
            prefetch_queue_depth=1,
        )
        def pipe():
            jpg = fn.external_source(name="jpg", no_copy=False)
            anchor = fn.external_source(name="anchor")
            shape = fn.external_source(name="shape")
            flip = fn.external_source(name="flip")
            img = fn.decoders.image_slice(
                jpg,
                anchor,
                shape,
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                axis_names="WH",
                normalized_anchor=False,
                normalized_shape=False,
            )
            img = fn.resize(
                img, size=[self.size, self.size], interp_type=types.INTERP_CUBIC, antialias=True
            )
            img = fn.flip(img, horizontal=flip)
            return fn.transpose(img, perm=[2, 0, 1])

        p = pipe()
        p.build()
        return p

    def _run(self, batch: EncodedBatch) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        boxes = batch.boxes
        p.feed_input("jpg", batch.data)
        p.feed_input("anchor", [np.array([b[1], b[0]], dtype=np.float32) for b in boxes])
        p.feed_input("shape", [np.array([b[3], b[2]], dtype=np.float32) for b in boxes])
        p.feed_input("flip", [np.array(f, dtype=np.int32) for f in batch.flips])
        (out,) = p.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            result = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
            return result
        return torch.from_numpy(np.array(out.as_array()))

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """The decoded batch and the ``(name, reason)`` of files replaced in it."""
        if len(batch) > self.max_batch:
            raise ValueError(f"batch of {len(batch)} > max_batch={self.max_batch}")
        try:
            return self._run(batch), []
        except Exception:  # a file DALI cannot decode: this batch on the CPU, file by file
            self._pipe = None  # a failed DALI pipeline is not reusable
            self.fallbacks += 1
            return self._cpu(batch)

    def _cpu(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        views: list[torch.Tensor | None] = []
        skipped: list[tuple[str, str]] = []
        for data, box, flip, name in zip(
            batch.data, batch.boxes, batch.flips, batch.names, strict=True
        ):
            try:
                box = tuple(int(v) for v in box)
                views.append(
                    self.fallback.render(EncodedImage(name, data.tobytes()), box, bool(flip))
                )
            except UnreadableImageError as err:
                views.append(None)
                skipped.append((err.path, err.reason))
        good = [v for v in views if v is not None]
        if not good:
            raise UnreadableImageError(batch.names[0], "no image of the batch could be decoded")
        filled = [v if v is not None else good[i % len(good)] for i, v in enumerate(views)]
        return torch.stack(filled).to(self.device), skipped


__all__ = [
    "CropPlan",
    "DaliDecoder",
    "EncodedBatch",
    "collate_encoded",
    "require_dali",
]
