"""Tokenizer targets: code indices from a tokenizer you bring (a VQ tokenizer loaded from a local
weights file, a BEiT-style visual tokenizer, ...), predicted as logits and scored by
cross-entropy on masked cells like ``target=codebook``.

The tokenizer is built by Hydra from ``target.tokenizer._target_`` (your function or class and
its arguments). It maps the run's normalised images (B, 3, H, W) to integer code indices: one
(B, h, w) grid, used by every tap whose cells are its tokens or a whole fraction of them (a
finer tap's cells take their token's code), or a list of grids, one per tap at that tap's
cells. Its shape, dtype and code range are checked on one image before training.

Like a teacher, the tokenizer is frozen and not a submodule: it is in no optimizer and no
checkpoint (checkpoints hold its class and a digest of its weights). It runs in float32.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from lmim.errors import ConfigError
from lmim.targets.codebook import CodeTarget, assign, load_codebook, make_base
from lmim.utils import weights_digest

log = logging.getLogger("lmim")
SHAPE = (
    "a tokenizer must return integer code indices of shape (B, h, w), or a list of such grids "
    "with one per tap"
)


class Tokenizer(CodeTarget):
    """Code indices of a user-given tokenizer at each tap's cells.

    Args:
        cell_sizes: the taps' cell sides in pixels (from the schedule).
        tokenizer: the tokenizer (built from ``target.tokenizer``): normalised images to code
            indices, one (B, h, w) grid or a list of one grid per tap.
        codes: its vocabulary size (None: the tokenizer's ``num_codes`` attribute).
        img_size: the run's image size, for the check on one image.
    """

    def __init__(
        self,
        cell_sizes: Sequence[float],
        tokenizer: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]] | None = None,
        codes: int | None = None,
        img_size: int = 224,
    ) -> None:
        super().__init__(cell_sizes)
        if tokenizer is None or not callable(tokenizer):
            raise ConfigError(
                "target.tokenizer must build a callable tokenizer: set target.tokenizer._target_ "
                "to your function or class (and its arguments beside it)"
            )
        if isinstance(tokenizer, nn.Module):
            tokenizer.eval().requires_grad_(False)
        # Not a registered submodule: no optimizer, no checkpoint, no precision cast sees it.
        object.__setattr__(self, "_tokenizer", tokenizer)
        codes = codes if codes is not None else getattr(tokenizer, "num_codes", None)
        if codes is None or int(codes) < 2:
            raise ConfigError(
                f"target.codes={codes}: pass the tokenizer's vocabulary size as target.codes "
                "(or give the tokenizer a num_codes attribute)"
            )
        self.num_codes = int(codes)
        self.tokenizer_name = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
        self.tokenizer_digest = weights_digest(tokenizer)
        probe = torch.zeros(1, 3, int(img_size), int(img_size))  # the mean image
        with torch.no_grad():
            grids = self.compute(probe)
        top = max(int(g.max()) for g in grids)
        low = min(int(g.min()) for g in grids)
        if low < 0 or top >= self.num_codes:
            raise ConfigError(
                f"the tokenizer returned code {top if top >= self.num_codes else low}, outside "
                f"0..{self.num_codes - 1}: target.codes must be its vocabulary size"
            )

    @property
    def tokenizer(self) -> Callable:
        return self._tokenizer

    @property
    def dims(self) -> list[int]:
        return [self.num_codes] * len(self.cell_sizes)

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        H, W = images.shape[-2:]
        tok = self._tokenizer
        if isinstance(tok, nn.Module):  # follows the images' device, in its own dtype
            first = next(itertools.chain(tok.parameters(), tok.buffers()), None)
            if first is not None and first.device != images.device:
                tok.to(images.device)
        out = tok(images)
        many = isinstance(out, (list, tuple))
        grids = list(out) if many else [out]
        if many and len(grids) != len(self.cell_sizes):
            raise ConfigError(
                f"the tokenizer returned {len(grids)} grids for {len(self.cell_sizes)} taps: "
                f"{SHAPE}"
            )
        for g in grids:
            if not isinstance(g, torch.Tensor) or g.dim() != 3 or g.shape[0] != images.shape[0]:
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ConfigError(
                    f"the tokenizer returned {shape} for {images.shape[0]} images: {SHAPE}"
                )
            if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
                raise ConfigError(
                    f"the tokenizer returned {g.dtype} values: {SHAPE} (e.g. logits.argmax(-1))"
                )
        result = []
        for k, c in enumerate(self.cell_sizes):
            want = (round(H / c), round(W / c))
            g = grids[k] if many else grids[0]
            h, w = g.shape[-2:]
            if (h, w) != want:
                finer = want[0] % h == 0 and want[1] % w == 0 and want[0] // h == want[1] // w
                if many or not finer:
                    raise ConfigError(
                        f"the tokenizer's {h}x{w} grid cannot give a tap's {c}-px cells "
                        f"({want[0]}x{want[1]} at {H}x{W}): one grid serves the taps at its "
                        "tokens or finer whole fractions of them; for coarser taps return one "
                        "grid per tap, or change schedule.scales"
                    )
                r = want[0] // h
                g = g.repeat_interleave(r, 1).repeat_interleave(r, 2)
            result.append(g.long().flatten(1))
        return result

    def get_extra_state(self) -> dict[str, str | None]:
        return {"tokenizer": self.tokenizer_name, "tokenizer_sha256": self.tokenizer_digest}

    def set_extra_state(self, state: dict[str, str | None]) -> None:
        if state.get("tokenizer_sha256") not in (None, self.tokenizer_digest):
            log.warning(
                "the tokenizer's weights differ from those this checkpoint was trained with "
                "(%s, sha256 %s...)",
                state.get("tokenizer"),
                str(state.get("tokenizer_sha256"))[:12],
            )


class CodebookTokenizer(nn.Module):
    """A tokenizer from a local weights file: the per-scale k-means codes of an lmim codebook
    file (``python -m lmim.codebook``), one grid per scale. ``target=tokenizer`` with it gives
    the targets of ``target=codebook`` with that file; it shows the interface a VQ tokenizer of
    your own implements.

    Args:
        path: the codebook file.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            book = load_codebook(path)
        except ConfigError as err:  # named as this tokenizer's setting
            raise ConfigError(str(err).replace("target.path", "target.tokenizer.path")) from None
        self.cell_sizes = [float(c) for c in book["cell_sizes"]]
        self.base = make_base(book["base"], self.cell_sizes)
        self.base.load_state_dict(book["base_state"])
        sizes = {int(c.shape[0]) for c in book["codes"]}
        if len(sizes) != 1:
            raise ConfigError(f"{path}: scales with different numbers of codes {sorted(sizes)}")
        self.num_codes = sizes.pop()
        for k, c in enumerate(book["codes"]):
            self.register_buffer(f"codes_{k}", c.float().clone())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        H, W = images.shape[-2:]
        out = []
        for k, (f, c) in enumerate(zip(self.base(images), self.cell_sizes, strict=True)):
            idx = assign(f, getattr(self, f"codes_{k}"))
            out.append(idx.view(images.shape[0], round(H / c), round(W / c)))
        return out
