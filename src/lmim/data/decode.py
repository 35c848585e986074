"""The fast pre-training view: RandomResizedCrop and flip decided from the file's header, before
decoding, and a uint8 result that is normalised on the device.

Same semantics as :func:`lmim.data.transforms.pretrain_transform` (the ``pil`` pipeline): the
crop box and the flip come from the same draws of torch's default generator, so a seeded sample
gets the same box and flip in both. What differs is how pixels are made:

- JPEGs are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo; bit-identical to PIL's
  decode and faster), or, when the crop is at least 4, 8 or 16 times ``img_size`` on its short
  side, by PIL at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``). The margin of 2
  (``DRAFT_MARGIN``) is there because the DCT's own downscaling is not bicubic: with a margin
  of 1, 112 px views of ImageNet-sized photos were 2.4 levels RMS from the reference, with 2,
  0.24 (``benchmarks/loader.py``); ``data.draft_margin=0`` turns it off. Other formats, and
  CMYK JPEGs, are decoded by PIL and converted by :func:`lmim.data.images.to_rgb` as before.
- The crop is resized by torch's antialiased bicubic on uint8 (PIL's filter, a = -0.5),
  about three times faster than PIL's resize of the same crop.
- The result is a ``(3, S, S)`` uint8 tensor: a quarter of the bytes to move from workers and to
  the device, where :func:`normalize_uint8` does what ``ToTensor`` + ``Normalize`` did, with the
  same float32 operations.

The difference to the ``pil`` pipeline is measured by ``benchmarks/loader.py``
(docs/benchmarks.md): 0.14 levels RMS at 224 px on ImageNet-sized photos.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from lmim.data.images import EncodedImage, UnreadableImageError, error_reason, to_rgb


def open_header(name: str, data: bytes) -> Image.Image:
    """The image in ``data``, opened lazily (header read, pixels not decoded).

    Raises:
        UnreadableImageError: ``data`` is not an image PIL recognises.
    """
    try:
        return Image.open(io.BytesIO(data))
    except Exception as err:
        raise UnreadableImageError(name, error_reason(err)) from err


def _chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 view of its pixels (channels-last in memory, which is
    what torch's uint8 resize runs fastest on)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


# Reduced-scale decoding only when the reduced crop is still this many times img_size (the
# difference this leaves to the full-scale view is measured in docs/benchmarks.md).
DRAFT_MARGIN = 2.0


class CropDecode:
    """RandomResizedCrop(``img_size``, ``crop_scale``, bicubic) + horizontal flip to a uint8
    ``(3, img_size, img_size)`` tensor, from an :class:`EncodedImage` (cropped before decoding)
    or a decoded PIL image.

    The random draws are those of torchvision's transforms (``get_params``, then one
    ``torch.rand(1)`` for the flip), on torch's default generator, which :class:`TrainSet`
    seeds per sample.

    Args:
        img_size: output side.
        crop_scale: area range of the crop.
        hflip: flip probability.
        ratio: aspect-ratio range of the crop.
        draft_margin: decode at 1/k scale only when the reduced crop is still at least
            ``draft_margin x img_size`` on its short side (0 turns reduced decoding off).
    """

    def __init__(
        self,
        img_size: int,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip: float = 0.5,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        draft_margin: float = DRAFT_MARGIN,
    ) -> None:
        self.size = int(img_size)
        self.scale = tuple(float(s) for s in crop_scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.hflip = float(hflip)
        self.draft_margin = float(draft_margin)

    def params(self, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """``(top, left, h, w, flip)`` of a ``width x height`` image, drawn like
        ``RandomResizedCrop`` + ``RandomHorizontalFlip``."""
        shape = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the shape only
        top, left, h, w = RandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.hflip)
        return int(top), int(left), int(h), int(w), flip

    def draft_factor(self, h: int, w: int) -> int:
        """The largest of 1, 2, 4, 8 whose reduced crop is still at least ``draft_margin x
        img_size`` on both sides (1: decode at full scale)."""
        k = 1
        if self.draft_margin <= 0:
            return k
        while k < 8 and min(h, w) >= 2 * k * self.draft_margin * self.size:
            k *= 2
        return k

    def __call__(self, img: EncodedImage | Image.Image) -> torch.Tensor:
        if isinstance(img, Image.Image):
            width, height = img.size
            top, left, h, w, flip = self.params(width, height)
            return self._resize(_chw(img.convert("RGB")), (top, left, h, w), 1.0, 1.0, flip)
        data = img.read()
        header = open_header(img.name, data)
        top, left, h, w, flip = self.params(*header.size)
        return self._decode(img.name, data, header, (top, left, h, w), flip)

    def render(self, img: EncodedImage, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """The view of ``img`` for a drawn ``box`` = ``(top, left, h, w)`` (full-scale pixels)
        and ``flip``: decode (at reduced scale when the box allows), crop, resize, flip."""
        data = img.read()
        return self._decode(img.name, data, open_header(img.name, data), box, flip)

    def _decode(
        self,
        name: str,
        data: bytes,
        header: Image.Image,
        box: tuple[int, int, int, int],
        flip: bool,
    ) -> torch.Tensor:
        width, height = header.size
        try:
            if header.format == "JPEG" and header.mode in ("RGB", "L"):
                k = self.draft_factor(box[2], box[3])
                if k == 1:
                    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    pixels = decode_jpeg(raw, mode=ImageReadMode.RGB)
                else:
                    header.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
                    pixels = _chw(header.convert("RGB"))
            else:
                header.load()
                pixels = _chw(to_rgb(header))
        except Exception as err:
            raise UnreadableImageError(name, error_reason(err)) from err
        finally:
            header.close()
        sy, sx = pixels.shape[1] / height, pixels.shape[2] / width
        return self._resize(pixels, box, sy, sx, flip)

    def _resize(
        self,
        pixels: torch.Tensor,
        box: tuple[int, int, int, int],
        sy: float,
        sx: float,
        flip: bool,
    ) -> torch.Tensor:
        top, left, h, w = box
        y0, x0 = round(top * sy), round(left * sx)
        y1 = max(y0 + 1, round((top + h) * sy))
        x1 = max(x0 + 1, round((left + w) * sx))
        crop = pixels[:, y0:y1, x0:x1].unsqueeze(0)
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True)
        out = out[0]
        if flip:
            out = out.flip(-1)
        return out.contiguous()


def normalize_uint8(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> normalised float32, by the operations of torchvision's ``ToTensor``
    and ``Normalize`` (divide by 255, subtract the mean, divide by the std), on the tensor's
    device. ``mean`` and ``std`` already on that device (float32) are used as they are."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).div(255).sub_(m).div_(s)
