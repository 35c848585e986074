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
The LightningModule is :class:`lmim.classifiers.FinetuneModule`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lmim.cli import hydra_entry
from lmim.errors import ConfigError
from lmim.utils import set_matmul_precision

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn

# torch, timm, Lightning and the model are imported by the functions that use them: Hydra
# composes (and answers --help or a mistyped key) before any of them is loaded.

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
    from torch import nn

    from lmim import create_pretrainer
    from lmim.export import encoder_state_dict, load_pretrainer, timm_model

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
    from PIL import Image
    from timm.data.auto_augment import posterize as timm_posterize

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


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Build the classifier and data, fine-tune, return the validation accuracies (``val/top1``,
    ``val/top5`` with at least 5 classes) and the weight-loading report."""
    from timm.data import create_transform
    from torch.utils.data import DataLoader

    from lmim.classifiers import FinetuneModule
    from lmim.evaluation import fit_metrics, labelled_datamodule

    set_matmul_precision(cfg.get("matmul_precision"))
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
    from lmim.evaluation import run_entry_point

    return run_entry_point(finetune, cfg)


if __name__ == "__main__":
    main()
