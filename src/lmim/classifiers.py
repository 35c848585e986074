"""The LightningModules of the evaluations: :class:`FinetuneModule` (``python -m lmim.finetune``,
LocalMIM's fine-tuning recipe from timm's parts) and :class:`LinearProbe` (``python -m
lmim.linprobe``, a linear classifier on frozen features). The entry modules import this one only
when they run, so that their ``--help`` and a mistyped key answer without importing Lightning."""

from __future__ import annotations

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

from lmim.evaluation import accuracy_metrics
from lmim.module import warmup_cosine


def log_accuracies(module: L.LightningModule, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Update the module's ``val_metrics`` (torchmetrics accuracies) with a validation batch and
    log them as ``val/<name>`` (Lightning computes and resets them at the epoch's end)."""
    for name, metric in module.val_metrics.items():
        metric.update(logits, y)
        module.log(f"val/{name}", metric, prog_bar=name == "top1")


class FinetuneModule(L.LightningModule):
    """Supervised fine-tuning with the LocalMIM/MAE recipe, built from timm's parts.

    Args:
        model: the timm classifier.
        num_classes: classes.
        blr: base lr; lr = blr x global batch / 256.
        min_lr: end of the cosine.
        warmup_epochs: per-step linear warm-up.
        weight_decay: AdamW weight decay (not on 1-D parameters, pos_embed, cls_token).
        layer_decay: layer-wise lr decay (timm's layer grouping).
        mixup: timm Mixup keyword arguments (None disables Mixup/CutMix).
        smoothing: label smoothing (with or without Mixup).
        batch_size: images per device, for the lr scaling.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        blr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 5,
        weight_decay: float = 0.05,
        layer_decay: float = 0.65,
        mixup: dict | None = None,
        smoothing: float = 0.1,
        batch_size: int = 128,
    ) -> None:
        super().__init__()
        self.model = model
        self.batch_size = batch_size
        self.blr, self.min_lr, self.warmup_epochs = blr, min_lr, warmup_epochs
        self.weight_decay, self.layer_decay = weight_decay, layer_decay
        self.mixup = (
            Mixup(**mixup, label_smoothing=smoothing, num_classes=num_classes) if mixup else None
        )
        self.train_loss = (
            SoftTargetCrossEntropy()
            if self.mixup
            else nn.CrossEntropyLoss(label_smoothing=smoothing)
        )
        self.val_metrics = accuracy_metrics(num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        loss = self.train_loss(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        log_accuracies(self, self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        accum = self.trainer.accumulate_grad_batches
        global_batch = self.batch_size * self.trainer.world_size * accum
        lr = self.blr * global_batch / 256
        opt = create_optimizer_v2(
            self.model, "adamw", lr=lr, weight_decay=self.weight_decay, layer_decay=self.layer_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        return warmup_cosine(opt, total, int(round(self.warmup_epochs * per_epoch)), self.min_lr)

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        scheduler.step_update(num_updates=self.global_step)


class LinearProbe(L.LightningModule):
    """BatchNorm (no affine) + Linear on frozen features.

    Args:
        dim: feature width.
        num_classes: classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, dim: int, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.lr, self.weight_decay = lr, weight_decay
        self.val_metrics = accuracy_metrics(num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        log_accuracies(self, self.head(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs)
        return [opt], [sched]
