"""Codebook targets: each cell's target is the index of its nearest code in a per-scale codebook
over a base descriptor (HOG or normalised pixels at that cell size); the decoder predicts logits
over the codes, scored by cross-entropy on masked cells with the scale's cell weights.

Codebooks are fitted offline on the user's own training images by mini-batch k-means
(``python -m lmim.codebook``, :mod:`lmim.codebook`) and saved to a file that this target loads;
the codes are buffers of the model, so they travel in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmim.errors import ConfigError
from lmim.targets.base import Target

FORMAT = "lmim-codebook-1"
# The descriptors a codebook can be fitted over: the target configs of the same names (a test
# keeps these in step with conf/target/).
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "hog": ("HOG", {"nbins": 9, "bias": False}),
    "hog18": ("HOG", {"nbins": 18, "bias": True}),
    "pixel": ("NormalizedPixels", {"normalize": True}),
}


def make_base(base: str, cell_sizes: Sequence[float]) -> Target:
    """The base descriptor ``base`` (hog, hog18, pixel) at ``cell_sizes``."""
    import lmim.targets as targets

    if base not in BASES:
        raise ConfigError(
            f"target.base={base!r} is not a descriptor a codebook is fitted over: "
            f"{', '.join(BASES)}"
        )
    name, params = BASES[base]
    return getattr(targets, name)(cell_sizes=cell_sizes, **params)


def assign(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean) of each feature: (..., D), (K, D) -> (...)."""
    flat = features.reshape(-1, features.shape[-1]).float()
    # |f - c|^2 = |f|^2 - 2 f.c + |c|^2; |f|^2 does not change the argmin.
    scores = codes.float().pow(2).sum(-1)[None] - 2 * flat @ codes.float().T
    return scores.argmin(-1).reshape(features.shape[:-1])


def usage(indices: torch.Tensor, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity of the code distribution (``codes`` when uniform) and the number of unused
    codes, as scalar tensors on the indices' device (no host synchronisation)."""
    counts = torch.bincount(indices.flatten(), minlength=codes).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return entropy.exp(), (counts == 0).sum().float()


def load_codebook(path: str | Path) -> dict[str, Any]:
    """A codebook file, checked: raises :class:`ConfigError` if it is missing or not one."""
    file = Path(str(path)).expanduser()
    fit = (
        "fit one with `python -m lmim.codebook data.root=<ImageFolder> target.base=hog "
        "target.codes=512 out=codebook.pt`"
    )
    if path in (None, "", "???"):
        raise ConfigError(f"target.path is not set: pass target.path=<codebook file>; {fit}")
    if not file.is_file():
        raise ConfigError(f"target.path={path} does not exist: {fit}")
    try:
        book = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"target.path={path} cannot be read as a codebook ({type(err).__name__}); {fit}"
        ) from err
    if not isinstance(book, dict) or book.get("format") != FORMAT:
        raise ConfigError(f"target.path={path} is not an lmim codebook file; {fit}")
    return book


class CodeTarget(Target):
    """A target whose per-cell outputs are code indices (B, N_k) over ``dims[k]`` codes: the
    decoder predicts logits, scored by cross-entropy on masked cells; code usage is logged.
    :class:`Codebook` and :class:`lmim.targets.Tokenizer` are ones."""

    def comparable(
        self, preds: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Code probabilities (softmax of the logits) and one-hot targets."""
        probs = [p.float().softmax(-1) for p in preds]
        hot = [F.one_hot(t, k).float() for t, k in zip(targets, self.dims, strict=True)]
        return probs, hot

    def step_metrics(self, targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Code usage in the batch, per scale: ``codebook/perplexity_<cell>px`` (the number of
        codes when all are used alike) and ``codebook/unused_<cell>px`` (codes no cell took)."""
        out = {}
        for cell, idx, k in zip(self.cell_sizes, targets, self.dims, strict=True):
            perplexity, unused = usage(idx, k)
            out[f"codebook/perplexity_{cell:g}px"] = perplexity
            out[f"codebook/unused_{cell:g}px"] = unused
        return out

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits ``pred`` (B, N, K) against code indices ``target`` (B, N),
        weighted per cell like the MSE of the other targets."""
        ce = F.cross_entropy(
            pred.float().flatten(0, 1), target.flatten(), reduction="none"
        ).view_as(weight)
        return (ce * weight).sum() / weight.sum().clamp_min(1e-12)


class Codebook(CodeTarget):
    """Nearest-code indices of a base descriptor, per tap's cell size.

    Args:
        cell_sizes: the taps' cell sides in pixels (from the schedule).
        path: the codebook file (``python -m lmim.codebook``).
        base: the descriptor the codebook must have been fitted over (hog, hog18, pixel).
        codes: codes per scale the run expects (None: the file's).
    """

    def __init__(
        self,
        cell_sizes: Sequence[float],
        path: str | None = None,
        base: str = "hog",
        codes: int | None = None,
    ) -> None:
        super().__init__(cell_sizes)
        book = load_codebook(path)
        if book["base"] != base:
            raise ConfigError(
                f"target.path={path} was fitted over {book['base']}, but this run asks for "
                f"target.base={base}: pass target.base={book['base']}, or fit a codebook over "
                f"{base}"
            )
        fitted = [float(c) for c in book["cell_sizes"]]
        if fitted != [float(c) for c in self.cell_sizes]:
            raise ConfigError(
                f"target.path={path} was fitted for {fitted}-px cells, but this run's taps need "
                f"{[float(c) for c in self.cell_sizes]}-px cells (model and schedule): fit it "
                "with the same model= and schedule= as the run"
            )
        sizes = [int(c.shape[0]) for c in book["codes"]]
        if codes is not None and any(s != int(codes) for s in sizes):
            raise ConfigError(
                f"target.codes={codes}, but target.path={path} holds {sizes} codes per scale: "
                "drop target.codes (the file decides) or fit with that many"
            )
        self.path, self.base_name = str(path), base
        self.base = make_base(base, self.cell_sizes)
        self.base.load_state_dict(book["base_state"])
        for k, c in enumerate(book["codes"]):
            self.register_buffer(f"codes_{k}", c.float().clone())

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{k}") for k in range(len(self.cell_sizes))]

    @property
    def dims(self) -> list[int]:
        return [int(c.shape[0]) for c in self.codes]

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.base.compute(images)
        return [assign(f, c) for f, c in zip(feats, self.codes, strict=True)]

    def comparable(
        self, preds: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Predicted and target cells as base descriptors: the expected code under the
        predicted distribution, and the target's code."""
        probs = [p.float().softmax(-1) for p in preds]
        pred = [q @ c for q, c in zip(probs, self.codes, strict=True)]
        return pred, [c[t] for t, c in zip(targets, self.codes, strict=True)]

    def figure(self, images, out, tap_names, patch_grid, mean, std, title, scores, zoom):
        """The base descriptor's picture, of the target codes and the expected predicted ones."""
        import dataclasses

        preds, targets = self.comparable(out.preds, out.targets)
        decoded = dataclasses.replace(out, preds=preds, targets=targets)
        title = f"{title}\n(codes drawn as their {self.base_name} vectors)" if title else title
        return self.base.figure(
            images, decoded, tap_names, patch_grid, mean, std, title, scores, zoom
        )
