"""Fine-tune a pre-trained encoder end to end: ``python -m lmim.finetune checkpoint=...``.

The encoder's weights (exported as by ``python -m lmim.export``) go into the matching timm model
with average pooling and a new head (ViT: new ``fc_norm``; Swin: new final norm), and it is
trained with LocalMIM's fine-tuning recipe (section 7), all from timm: layer-wise lr decay,
drop path, Mixup/CutMix with label smoothing, RandAugment, random erasing, per-step warm-up and
cosine. It trains on the ``data`` group's labelled ``train`` split and validates on its ``val``
split (ImageFolder ``train/`` and ``val/`` class folders, Fashion-MNIST's training and test
sets, or the demo photos' crops) in the recipe's evaluation view (``finetune.eval_crop_pct``:
resize 256, centre crop 224). ``val/top1`` and, with at least 5 classes, ``val/top5`` are the
validation accuracies (torchmetrics).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from omegaconf import DictConfig
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

from lmim.cli import hydra_entry
from lmim.errors import ConfigError
from lmim.evaluation import accuracy_metrics, fit_metrics, labelled_datamodule, run_entry_point
from lmim.export import encoder_state_dict, load_pretrainer, timm_model
from lmim.module import warmup_cosine

log = logging.getLogger("lmim")


def build_classifier(
    checkpoint: str | None,
    init_model: str | None,
    img_size: int,
    num_classes: int,
    drop_path_rate: float,
) -> tuple[nn.Module, dict[str, list[str]]]:
    """The timm classifier initialised from a pre-training checkpoint (or randomly).

    Returns:
        The model and the load report: ``missing`` (new: head, fc_norm / final norm) and
        ``unexpected`` (dropped) keys.
    """
    from lmim import create_pretrainer

    if checkpoint:
        net = load_pretrainer(checkpoint)
    elif init_model:
        net = create_pretrainer(init_model, img_size=img_size)
    else:
        raise ConfigError(
            "checkpoint is not set: pass checkpoint=/path/to/last.ckpt (from lmim.train), or "
            "init_model=<model name> to train from scratch"
        )
    if net.encoder.img_size != img_size:
        raise ConfigError(
            f"data.img_size={img_size} but the encoder was built for {net.encoder.img_size} px: "
            f"set data.img_size={net.encoder.img_size}"
        )
    model = timm_model(
        net.encoder, num_classes=num_classes, global_pool="avg", drop_path_rate=drop_path_rate
    )
    state = encoder_state_dict(net)
    # LocalMIM has no final encoder norm: the classifier's pooled-feature norm and head are new.
    state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if not checkpoint:
        state = {}
    report = model.load_state_dict(state, strict=False)
    missing = [k for k in report.missing_keys if checkpoint]
    encoder_missing = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm."))]
    if encoder_missing:
        raise ConfigError(f"the checkpoint lacks encoder weights: {encoder_missing[:5]} ...")
    nn.init.trunc_normal_(
        model.head.fc.weight if hasattr(model.head, "fc") else model.head.weight, std=2e-5
    )
    return model, {"missing": missing, "unexpected": list(report.unexpected_keys)}


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # what Pillow < 11 gave for 0 bits: all black
    return timm_posterize(img, bits_to_keep)


def pillow_safe_posterize(transform) -> int:
    """Let timm's RandAugment posterize to 0 bits under Pillow >= 11.

    With ``inc1`` (the recipe's ``rand-m9-mstd0.5-inc1``) posterize keeps ``4 - int(4 m / 10)``
    bits, 0 when the drawn magnitude reaches 10 (about 2% of draws at m9, std 0.5); Pillow >= 11
    raises ``ValueError`` for 0 bits, where older Pillow returned an all-black image, what the
    published fine-tunes were trained with. The posterize ops of ``transform`` get that result
    back. Returns how many ops were changed.
    """
    changed = 0
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
                changed += 1
    return changed


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
        x, y = batch
        logits = self.model(x)
        for name, metric in self.val_metrics.items():
            metric.update(logits, y)
            self.log(f"val/{name}", metric, prog_bar=name == "top1")

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


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Build the classifier and data, fine-tune, return the validation accuracies (``val/top1``,
    ``val/top5`` with at least 5 classes) and the weight-loading report."""
    dm = labelled_datamodule(cfg)
    f = cfg.finetune
    model, report = build_classifier(
        cfg.checkpoint, cfg.init_model, cfg.data.img_size, dm.num_classes, f.drop_path_rate
    )
    if cfg.checkpoint:
        log.info(
            "encoder weights loaded from %s; new: %s; dropped: %s",
            cfg.checkpoint,
            ", ".join(sorted(report["missing"])) or "none",
            ", ".join(sorted(report["unexpected"])) or "none",
        )
    else:
        log.info("init_model=%s: training from randomly initialised weights", cfg.init_model)
    size = cfg.data.img_size
    common = dict(input_size=size, interpolation="bicubic", mean=tuple(dm.mean), std=tuple(dm.std))
    train_tf = create_transform(
        is_training=True,
        auto_augment=f.auto_augment,
        re_prob=f.re_prob,
        re_mode="pixel",
        re_count=1,
        scale=tuple(f.crop_scale),
        **common,
    )
    pillow_safe_posterize(train_tf)
    eval_tf = create_transform(is_training=False, crop_pct=f.eval_crop_pct, **common)
    train_set = dm.labelled_dataset("train", train_tf)
    val_set = dm.labelled_dataset("val", eval_tf)
    module = FinetuneModule(
        model,
        dm.num_classes,
        f.blr,
        f.min_lr,
        f.warmup_epochs,
        f.weight_decay,
        f.layer_decay,
        dict(f.mixup) if f.mixup else None,
        f.smoothing,
        dm.batch_size,
    )
    loader = dict(batch_size=dm.batch_size, num_workers=dm.num_workers)
    metrics = fit_metrics(
        cfg,
        module,
        DataLoader(train_set, shuffle=True, drop_last=True, **loader),
        DataLoader(val_set, **loader),
    )
    log.info("fine-tuning %s", metrics)
    return {**metrics, **report}


@hydra_entry("finetune")
def main(cfg: DictConfig) -> float:
    return run_entry_point(finetune, cfg)


if __name__ == "__main__":
    main()
