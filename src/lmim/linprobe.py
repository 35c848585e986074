"""Linear probe of a frozen pre-trained encoder: ``python -m lmim.linprobe checkpoint=...``.

Features of one encoder layer (average-pooled patch tokens or the cls token) are computed once,
with nothing masked, from the ``data`` group's labelled ``train`` and ``val`` splits in its
evaluation view (ImageFolder: resize 256, centre crop 224), then a linear classifier behind a
BatchNorm without affine parameters (MAE's protocol) is trained on them with a real Lightning
Trainer; ``val/top1`` (and ``val/top5`` with at least 5 classes) is the validation accuracy.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lmim.cli import hydra_entry
from lmim.errors import ConfigError
from lmim.evaluation import (
    accuracy_metrics,
    extract_features,
    fit_metrics,
    labelled_datamodule,
    run_entry_point,
)

log = logging.getLogger("lmim")


def load_pretrainer_at(checkpoint: str, img_size: int) -> nn.Module:
    """The pre-training model of a checkpoint, checked to take ``img_size`` images."""
    from lmim.export import load_pretrainer

    net = load_pretrainer(checkpoint)
    if net.encoder.img_size != img_size:
        raise ConfigError(
            f"data.img_size={img_size} but {checkpoint} was pre-trained at "
            f"{net.encoder.img_size} px (fixed position embeddings): set "
            f"data.img_size={net.encoder.img_size}"
        )
    return net


def load_encoder(checkpoint: str | None, init_model: str | None, img_size: int) -> nn.Module:
    """The encoder of a pre-training checkpoint, or a randomly initialised one (a baseline)."""
    from lmim import create_pretrainer

    if checkpoint:
        return load_pretrainer_at(checkpoint, img_size).encoder
    if not init_model:
        raise ConfigError(
            "checkpoint is not set: pass checkpoint=/path/to/last.ckpt (from lmim.train), or "
            "init_model=<model name> for a randomly initialised baseline"
        )
    return create_pretrainer(init_model, img_size=img_size).encoder


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
        x, y = batch
        logits = self.head(x)
        for name, metric in self.val_metrics.items():
            metric.update(logits, y)
            self.log(f"val/{name}", metric, prog_bar=name == "top1")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs)
        return [opt], [sched]


def linprobe(cfg: DictConfig) -> dict[str, Any]:
    """Extract features, train the probe, return the validation accuracies (``val/top1``,
    ``val/top5`` with at least 5 classes) and the split sizes."""
    dm = labelled_datamodule(cfg)
    encoder = load_encoder(cfg.checkpoint, cfg.init_model, cfg.data.img_size)
    p = cfg.probe
    train = extract_features(encoder, dm.eval_dataloader("train"), p.layer, p.pool)
    val = extract_features(encoder, dm.eval_dataloader("val"), p.layer, p.pool)
    module = LinearProbe(train[0].shape[1], dm.num_classes, p.lr, p.weight_decay)
    metrics = fit_metrics(
        cfg,
        module,
        DataLoader(TensorDataset(*train), batch_size=p.batch_size, shuffle=True),
        DataLoader(TensorDataset(*val), batch_size=1024),
    )
    log.info("linear probe %s (layer %s, %s pooling)", metrics, p.layer, p.pool)
    return {**metrics, "num_train": len(train[1]), "num_test": len(val[1])}


@hydra_entry("linprobe")
def main(cfg: DictConfig) -> float:
    return run_entry_point(linprobe, cfg)


if __name__ == "__main__":
    main()
