"""Pre-train with LocalMIM: ``python -m lmim.train model=vit_b target=hog data.root=...``.

Every hyper-parameter lives in the Hydra configs under ``conf/`` (see ``--help``); a mistyped key
is an error. Multirun sweeps (``-m target=hog,pixel``) give each job its own output folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmim.errors import ConfigError
from lmim.module import LocalMIMModule
from lmim.utils import (
    build_callbacks,
    build_loggers,
    config_dir,
    finish_wandb,
    instantiate_checked,
    to_container,
)

log = logging.getLogger("lmim")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, LocalMIMModule]:
    """Instantiate and check the data and the model; raises ConfigError before any training."""
    datamodule = instantiate_checked(cfg.data)
    datamodule.validate()
    net = instantiate_checked(cfg.model)
    module = LocalMIMModule(
        net=net,
        optimizer=instantiate(cfg.optim.optimizer),
        blr=cfg.optim.blr,
        min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_steps=cfg.optim.warmup_steps,
        config=to_container(cfg),
    )
    return datamodule, module


def check_trainer(cfg: DictConfig) -> None:
    devices = cfg.trainer.get("devices", 1)
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accel} but no GPU is visible: use trainer=cpu (or "
            "trainer.accelerator=cpu), or run on a GPU machine"
        )
    if isinstance(devices, int) and devices == 0:
        raise ConfigError("trainer.devices=0: use a positive number, -1 (all) or auto")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one pre-training job from a composed config; returns paths and final metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_trainer(cfg)
    datamodule, module = build(cfg)
    callbacks = build_callbacks(cfg.get("callbacks"))
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate_checked(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    exit_code = 1
    try:
        for lg in trainer.loggers:
            lg.log_hyperparams(module.config)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result: dict[str, Any] = {
        "metrics": metrics,
        "output_dir": cfg.paths.output_dir,
        "global_zero": trainer.is_global_zero,
    }
    for cb in trainer.callbacks:
        if hasattr(cb, "last_model_path") and getattr(cb, "last_model_path", ""):
            result["checkpoint"] = cb.last_model_path
        if hasattr(cb, "last_path") and cb.last_path is not None:
            result["figure"] = str(cb.last_path)
    for lg in trainer.loggers:
        if isinstance(lg, L.pytorch.loggers.CSVLogger):
            result["metrics_csv"] = str(Path(lg.log_dir) / "metrics.csv")
    return result


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("print_config_only"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    try:
        result = train(cfg)
    except ConfigError as err:
        print(f"lmim: error: {err}", file=sys.stderr)
        sys.exit(2)
    if not result["global_zero"]:
        return None
    log.info("done: %s", {k: v for k, v in result.items() if k != "metrics"})
    for key in ("checkpoint", "metrics_csv", "figure"):
        if key in result:
            print(f"{key}: {result[key]}")
    return result["metrics"].get("train/loss")


if __name__ == "__main__":
    main()
