"""The LightningModule: a pre-training model plus LocalMIM's optimisation recipe."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from lmim.errors import ConfigError


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters a module and its children exempt from weight decay."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            for n in sub.no_weight_decay():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups per part (encoder, decoders) x (decay, no decay).

    No decay on 1-D tensors (norms, biases), position embeddings and tokens (cls, mask). Frozen
    tensors (HOG filters, fixed position embeddings) are buffers and never reach the optimiser.
    """
    groups: list[dict[str, Any]] = []
    parts = {"encoder": net.encoder} if hasattr(net, "encoder") else {}
    rest = nn.ModuleDict({n: m for n, m in net.named_children() if n != "encoder"})
    parts["decoders"] = rest
    for part, module in parts.items():
        skip = no_decay_names(module)
        for g in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip):
            kind = "decay" if g["weight_decay"] else "no_decay"
            groups.append({**g, "name": f"{part}/{kind}"})
    return groups


class LocalMIMModule(L.LightningModule):
    """Pre-training loop around a :class:`lmim.models.LocalMIM` (or any model with the same
    ``forward(images) -> output.loss / output.losses`` contract).

    Args:
        net: the pre-training model.
        optimizer: partial optimizer, finished here with parameter groups and the lr.
        blr: base learning rate; lr = blr x global batch / 256 with global batch =
            per-device batch x devices x nodes x accumulate_grad_batches.
        min_lr: end of the cosine schedule.
        warmup_epochs: linear warm-up from 0, in (fractional) epochs, stepped per optimizer step.
        warmup_steps: warm-up in optimizer steps; overrides ``warmup_epochs`` when set.
        config: the resolved run config, stored in checkpoints (``lmim_config``).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        blr: float = 1.5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 40,
        warmup_steps: int | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.blr = blr
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.config = config
        self.lr: float | None = None
        self.global_batch: int | None = None

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        return self.net(images, mask)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = self.net(images)
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.losses.items():
            self.log(f"train/loss_{name}", value)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return out.loss

    def global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            raise ConfigError("the DataModule must expose batch_size (images per device)")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        self.global_batch = self.global_batch_size()
        self.lr = self.blr * self.global_batch / 256
        total = int(self.trainer.estimated_stepping_batches)
        if self.warmup_steps is not None:
            warmup = int(self.warmup_steps)
        else:
            batches = self.trainer.num_training_batches
            accum = self.trainer.accumulate_grad_batches
            per_epoch = 1 if math.isinf(batches) else max(1, math.ceil(batches / accum))
            warmup = int(round(self.warmup_epochs * per_epoch))
        warmup = min(warmup, max(total - 1, 0))
        opt = self.optimizer_factory(param_groups(self.net, self._weight_decay()), lr=self.lr)
        sched = CosineLRScheduler(
            opt,
            t_initial=max(total - warmup, 1),
            lr_min=self.min_lr,
            warmup_t=warmup,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _weight_decay(self) -> float:
        wd = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay")
        return 0.05 if wd is None else float(wd)

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        # timm schedulers are stepped with the number of optimizer updates done so far.
        scheduler.step_update(num_updates=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint["lmim_config"] = self.config
