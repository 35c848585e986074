"""Linear probe of a frozen pre-trained encoder: ``python -m lmim.linprobe checkpoint=...``.

Features of one encoder layer (average-pooled patch tokens or the cls token) are computed once,
with nothing masked, from the ``data`` group's labelled ``train`` and ``val`` splits in its
evaluation view (ImageFolder: resize 256, centre crop 224), then a linear classifier behind a
BatchNorm without affine parameters (MAE's protocol) is trained on them with a real Lightning
Trainer; ``val/top1`` (and ``val/top5`` with at least 5 classes) is the validation accuracy.
The LightningModule is :class:`lmim.classifiers.LinearProbe`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lmim.cli import hydra_entry
from lmim.errors import ConfigError
from lmim.utils import set_matmul_precision

if TYPE_CHECKING:
    from torch import nn

# torch, Lightning and the model are imported by the functions that use them: Hydra composes
# (and answers --help or a mistyped key) before any of them is loaded.

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


def linprobe(cfg: DictConfig) -> dict[str, Any]:
    """Extract features, train the probe, return the validation accuracies (``val/top1``,
    ``val/top5`` with at least 5 classes) and the split sizes."""
    from torch.utils.data import DataLoader, TensorDataset

    from lmim.classifiers import LinearProbe
    from lmim.evaluation import extract_features, fit_metrics, labelled_datamodule

    set_matmul_precision(cfg.get("matmul_precision"))
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
    from lmim.evaluation import run_entry_point

    return run_entry_point(linprobe, cfg)


if __name__ == "__main__":
    main()
