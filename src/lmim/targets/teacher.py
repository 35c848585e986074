"""Teacher targets: a frozen network's per-token features of one layer, resampled to each tap's
cell grid, normalised per token (LayerNorm without affine, as MaskDistill and data2vec do) and
regressed with smooth-L1 or negative cosine on masked cells.

The teacher is any timm model by name with a local weights file (``checkpoint_path``; nothing is
downloaded), or the encoder of an lmim pre-training checkpoint exported to timm. It runs without
gradients under the run's autocast (``precision = "run"``), and it is not a submodule of the
model: its parameters are in no optimizer and in no checkpoint. Checkpoints hold the weights
file's path and SHA-256 instead, checked when a run resumes. Its forward cost is counted by the
FLOP accounting like the rest of the step, since it runs inside the model's forward.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmim.errors import ConfigError
from lmim.targets.base import Target

log = logging.getLogger("lmim")
LOSSES = ("smooth_l1", "cosine")


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resample(feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *grid): average-pooled when the teacher's grid is an integer
    multiple of ``grid``, repeated when ``grid`` is an integer multiple of the teacher's."""
    h, w = feats.shape[-2:]
    if (h, w) == tuple(grid):
        return feats
    if h % grid[0] == 0 and w % grid[1] == 0:
        return F.avg_pool2d(feats, (h // grid[0], w // grid[1]))
    if grid[0] % h == 0 and grid[1] % w == 0:
        return feats.repeat_interleave(grid[0] // h, 2).repeat_interleave(grid[1] // w, 3)
    raise ValueError(f"a {h}x{w} teacher grid cannot be resampled to {grid[0]}x{grid[1]}")


class Teacher(Target):
    """Per-token features of a frozen teacher at each tap's cell size.

    Args:
        cell_sizes: the taps' cell sides in pixels (from the schedule).
        model: timm model name of the teacher (e.g. ``vit_small_patch16_224``).
        checkpoint_path: its local weights file (a timm / ``lmim.export`` state dict).
        layer: the block whose output is the target (timm ``forward_intermediates`` index;
            -1: the last).
        loss: ``smooth_l1`` or ``cosine`` (negative cosine similarity).
        img_size: the run's image size (the teacher is built for it).
        model_kwargs: more arguments of ``timm.create_model`` (e.g. ``{"depth": 6}``).
    """

    precision = "run"

    def __init__(
        self,
        cell_sizes: Sequence[float],
        model: str | None = None,
        checkpoint_path: str | None = None,
        layer: int = -1,
        loss: str = "smooth_l1",
        img_size: int = 224,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cell_sizes)
        if loss not in LOSSES:
            raise ConfigError(f"target.loss={loss!r} is not one of {', '.join(LOSSES)}")
        self.loss_name, self.layer, self.img_size = loss, int(layer), int(img_size)
        if not model:
            raise ConfigError(
                "target.model is not set: a timm model name, e.g. vit_small_patch16_224"
            )
        if checkpoint_path in (None, "", "???"):
            raise ConfigError(
                "target.checkpoint_path is not set: pass target.checkpoint_path=<the teacher's "
                "local weights file> (a timm state dict, or `python -m lmim.export` of an lmim "
                "checkpoint); nothing is downloaded"
            )
        path = Path(str(checkpoint_path)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"target.checkpoint_path={checkpoint_path} is not a file: the teacher's weights "
                "must be a local file (a timm state dict, or `python -m lmim.export` of an lmim "
                "checkpoint); nothing is downloaded"
            )
        self.teacher_file, self.teacher_digest = str(path), file_digest(path)
        kwargs = {"img_size": self.img_size, **dict(model_kwargs or {})}
        teacher = self.build(str(model), path, kwargs)
        # Not a registered submodule: no optimizer, no checkpoint, no precision cast sees it.
        object.__setattr__(self, "_teacher", teacher)
        self.reduction = self._reduction(teacher)
        for c in self.cell_sizes:
            r = self.reduction
            if not (float(r / c).is_integer() or float(c / r).is_integer()):
                raise ConfigError(
                    f"target=teacher: its layer {self.layer} has {r}-px tokens, which cannot be "
                    f"resampled to a tap's {c}-px cells (one must be a whole multiple of the "
                    "other): choose another teacher, layer or schedule.scales"
                )
        self.width = self._width(teacher)

    @staticmethod
    def build(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
        import timm

        try:
            teacher = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except Exception as err:
            raise ConfigError(f"target.model={name}: timm cannot build it ({err})") from err
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        try:
            missing, unexpected = teacher.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes differ (another width, patch or image size)
            first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
            raise ConfigError(
                f"target.checkpoint_path={path} does not hold the weights of {name} built with "
                f"{kwargs} ({first.strip()}); check target.model, target.model_kwargs and "
                "data.img_size"
            ) from err
        missing = [k for k in missing if not k.startswith("head")]
        if missing:
            raise ConfigError(
                f"target.checkpoint_path={path} does not hold the weights of {name}: "
                f"{len(missing)} missing (e.g. {missing[:2]}); check target.model and "
                "target.model_kwargs"
            )
        if unexpected:
            log.info("teacher %s: ignored %d extra keys of %s", name, len(unexpected), path)
        return teacher.eval().requires_grad_(False)

    def _reduction(self, teacher: nn.Module) -> int:
        info = getattr(teacher, "feature_info", None)
        if not info:
            raise ConfigError(
                "target.model: the teacher has no feature_info (use a timm ViT or Swin)"
            )
        return int(info[self.layer]["reduction"])

    def _width(self, teacher: nn.Module) -> int:
        return int(teacher.feature_info[self.layer]["num_chs"])

    def _apply(self, fn, recurse: bool = True):
        # Moves and casts of the model (.to(device), bf16-true) reach the unregistered teacher.
        super()._apply(fn, recurse)
        self._teacher._apply(fn, recurse)
        return self

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def dims(self) -> list[int]:
        return [self.width] * len(self.cell_sizes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) token features of the teacher's layer."""
        teacher = self._teacher
        weight = next(teacher.parameters())
        if not torch.is_autocast_enabled(images.device.type) and images.dtype != weight.dtype:
            images = images.to(weight.dtype)
        out = teacher.forward_intermediates(
            images, indices=[self.layer], output_fmt="NCHW", intermediates_only=True
        )
        return out[0]

    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.features(images)
        H, W = images.shape[-2:]
        out = []
        for c in self.cell_sizes:
            grid = (round(H / c), round(W / c))
            tokens = resample(feats, grid).flatten(2).transpose(1, 2)  # B, N, C
            out.append(F.layer_norm(tokens.float(), tokens.shape[-1:]))
        return out

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.loss_name == "cosine":
            err = 1 - F.cosine_similarity(pred, target, dim=-1)
        else:
            err = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
        return (err * weight).sum() / weight.sum().clamp_min(1e-12)

    def get_extra_state(self) -> dict[str, str]:
        return {"teacher_file": self.teacher_file, "teacher_sha256": self.teacher_digest}

    def set_extra_state(self, state: dict[str, str]) -> None:
        if state.get("teacher_sha256") not in (None, self.teacher_digest):
            log.warning(
                "the teacher's weights %s differ from those this checkpoint was trained with "
                "(%s, sha256 %s...)",
                self.teacher_file,
                state.get("teacher_file"),
                str(state.get("teacher_sha256"))[:12],
            )
