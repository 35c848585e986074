"""Linear probe of a frozen pre-trained encoder: ``python -m lmim.linprobe checkpoint=...``.

Features of one encoder layer (average-pooled patch tokens or the cls token) are computed once,
with nothing masked, then a linear classifier behind a BatchNorm without affine parameters (MAE's
protocol) is trained on them with a real Lightning Trainer; ``val/top1`` is the test accuracy.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lmim.errors import ConfigError
from lmim.evaluation import extract_features, fit_top1, labelled_datamodule, run_entry_point
from lmim.utils import config_dir

log = logging.getLogger("lmim")


def load_encoder(checkpoint: str | None, init_model: str | None, img_size: int) -> nn.Module:
    """The encoder of a pre-training checkpoint, or a randomly initialised one (a baseline)."""
    from lmim import create_pretrainer
    from lmim.export import load_pretrainer

    if checkpoint:
        enc = load_pretrainer(checkpoint).encoder
        if enc.img_size != img_size:
            raise ConfigError(
                f"data.img_size={img_size} but {checkpoint} was pre-trained at {enc.img_size} "
                f"px (fixed position embeddings): set data.img_size={enc.img_size}"
            )
        return enc
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
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_top1.update(self.head(x), y)
        self.log("val/top1", self.val_top1, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs)
        return [opt], [sched]


def linprobe(cfg: DictConfig) -> dict[str, Any]:
    """Extract features, train the probe, return the test top-1 (``val/top1``)."""
    dm = labelled_datamodule(cfg)
    encoder = load_encoder(cfg.checkpoint, cfg.init_model, cfg.data.img_size)
    p = cfg.probe
    train = extract_features(encoder, dm.eval_dataloader("train"), p.layer, p.pool)
    test = extract_features(encoder, dm.eval_dataloader("test"), p.layer, p.pool)
    module = LinearProbe(train[0].shape[1], dm.num_classes, p.lr, p.weight_decay)
    top1 = fit_top1(
        cfg,
        module,
        DataLoader(TensorDataset(*train), batch_size=p.batch_size, shuffle=True),
        DataLoader(TensorDataset(*test), batch_size=1024),
    )
    log.info("linear probe top-1 %.4f (layer %s, %s pooling)", top1, p.layer, p.pool)
    return {"val/top1": top1, "num_train": len(train[1]), "num_test": len(test[1])}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="linprobe")
def main(cfg: DictConfig) -> float:
    return run_entry_point(linprobe, cfg)


if __name__ == "__main__":
    main()
