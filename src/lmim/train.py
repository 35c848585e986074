"""Pre-train with LocalMIM: ``python -m lmim.train model=vit_b target=hog data.root=...``.

Every hyper-parameter lives in the Hydra configs under ``conf/`` (see ``--help``); a mistyped key
is an error. Multirun sweeps (``-m target=hog,pixel``) give each job its own output folder.
Re-running a command whose output folder holds ``checkpoints/last.ckpt`` resumes from it
(``resume=true``; give the folder a fixed name with ``run_id=NAME``).

Lightning, torch and the model are imported by the functions that use them, not here: ``--help``,
``--cfg job`` and a mistyped key or option answer in about a second instead of after the ~5 s
those imports take.
"""

from __future__ import annotations

import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmim.cli import fail, hydra_entry, report
from lmim.errors import ConfigError, TrainingStoppedError
from lmim.rendezvous import share, trainer_endpoint
from lmim.utils import (
    build_callbacks,
    build_loggers,
    finish_wandb,
    instantiate_checked,
    set_matmul_precision,
    to_container,
    wandb_run_id,
)

if TYPE_CHECKING:
    import lightning as L

    from lmim.module import LocalMIMModule

log = logging.getLogger("lmim")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, LocalMIMModule]:
    """Instantiate and check the data and the model; raises ConfigError before any training."""
    from lmim.module import LocalMIMModule

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
        seed=cfg.get("seed"),
        max_nonfinite_in_a_row=cfg.optim.get("max_nonfinite_in_a_row", 20),
        compile=to_container(cfg.compile) if cfg.get("compile") is not None else None,
    )
    return datamodule, module


def check_trainer(cfg: DictConfig) -> None:
    import torch

    devices = cfg.trainer.get("devices", 1)
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accel} but no GPU is visible: use trainer=cpu (or "
            "trainer.accelerator=cpu), or run on a GPU machine"
        )
    if isinstance(devices, int) and devices == 0:
        raise ConfigError("trainer.devices=0: use a positive number, -1 (all) or auto")


def check_strategy(trainer: L.Trainer, module: LocalMIMModule) -> None:
    """Before any process starts: the model's settings work with the trainer's strategy."""
    from lmim.fsdp import FSDP2Strategy

    if isinstance(trainer.strategy, FSDP2Strategy) and getattr(module.net, "batch_decoders", False):
        raise ConfigError(
            "model.batch_decoders=true reads all decoders' weights at once, but FSDP gathers "
            "each decoder block's own shard only for that block's forward: use "
            "model.batch_decoders=false with trainer=fsdp"
        )


def check_batches(trainer: L.Trainer, datamodule: L.LightningDataModule) -> None:
    """Before any process starts: every process gets a batch, and accumulation fits an epoch."""
    world = trainer.num_devices * trainer.num_nodes
    if hasattr(datamodule, "check_size"):
        datamodule.check_size(world)
    train_set, batch = getattr(datamodule, "train_set", None), getattr(datamodule, "batch_size", 0)
    if train_set is None or not batch or trainer.fast_dev_run:
        return
    per_process = math.ceil(len(train_set) / world)
    drop_last = getattr(datamodule, "drop_last", True)
    batches = per_process // batch if drop_last else math.ceil(per_process / batch)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    accumulate = trainer.accumulate_grad_batches
    if 0 < batches < accumulate:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} is more than the {batches} batches of "
            f"an epoch ({len(train_set)} images / (data.batch_size={batch} x {world} "
            "process(es))), so no update would see the intended global batch: lower "
            "trainer.accumulate_grad_batches (or data.batch_size, trainer.devices), or add images"
        )


# Keys that may change between an interrupted run and its resumption without a warning.
_RESUME_FREE = ("hydra", "paths", "run_id", "resume", "ckpt_path", "print_config_only", "logger")
_RESUME_FREE_LEAVES = ("trainer.max_epochs", "trainer.max_steps", "trainer.enable_progress_bar")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_checkpoint(path: str, config: dict | None = None, explicit: bool = False) -> int:
    """The global step of the checkpoint a run starts from (read lazily, memory-mapped).

    Warns about settings that differ from the checkpoint's run (they apply from now on).

    Args:
        path: the checkpoint.
        config: this run's resolved config.
        explicit: it was given as ``ckpt_path`` (not found by auto-resume).

    Raises:
        ConfigError: the checkpoint cannot be read.
    """
    from lmim.resume import load_checkpoint_meta

    try:
        ckpt = load_checkpoint_meta(path)  # a file, or a folder of shards (FSDP)
        step = int(ckpt.get("global_step", 0))
    except Exception as err:
        what = f"ckpt_path={path} is" if explicit else f"cannot resume from {path},"
        raise ConfigError(
            f"{what} not a readable checkpoint ({type(err).__name__}: {err}): pass ckpt_path= "
            "another one (e.g. an epoch_XXXX.ckpt next to it), or start in a new folder "
            "(run_id=NAME)"
        ) from err
    before = ckpt.get("lmim_config")
    if isinstance(before, dict) and config is not None:
        old, new = _leaves(before), _leaves(config)
        changed = [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
            and k.split(".")[0] not in _RESUME_FREE
            and k not in _RESUME_FREE_LEAVES
        ]
        if changed:
            log.warning("resuming with settings changed since %s: %s", path, "; ".join(changed))
    return step


def keep_csv_metrics(loggers: list) -> None:
    """Lightning's CSVLogger empties metrics.csv when it starts; on resume keep the interrupted
    run's file as metrics.part<k>.csv next to the new one (on global rank 0)."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            old = Path(lg.log_dir) / "metrics.csv"
            if old.is_file():
                k = 1
                while (old.parent / f"metrics.part{k}.csv").exists():
                    k += 1
                old.rename(old.parent / f"metrics.part{k}.csv")


def decide_start(cfg: DictConfig, last: Path, config: dict | None) -> dict[str, Any]:
    """What a run starts from; :func:`train` decides it on global rank 0 and shares it with every
    process before the process group exists (they may see the file system at different moments).

    Returns:
        ``ckpt_path`` (None: from scratch), ``step`` (its global step) and ``wandb_id`` (the W&B
        run to log to: the run folder's when resuming from its ``last.ckpt``, else a new one).
    """
    from lmim.resume import resume_checkpoint

    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), bool(cfg.get("resume", True)), last)
    step = None
    if ckpt_path is not None:
        step = read_checkpoint(ckpt_path, config, explicit=bool(cfg.get("ckpt_path")))
    resuming = ckpt_path is not None and Path(ckpt_path).resolve() == last.resolve()
    wandb_id = wandb_run_id(cfg.get("logger"), cfg.paths.output_dir, resuming)
    return {"ckpt_path": ckpt_path, "step": step, "wandb_id": wandb_id}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one pre-training job from a composed config; returns paths and final metrics.

    Resumes from ``<output_dir>/checkpoints/last.ckpt`` when it exists and ``resume`` is on
    (decided on rank 0 for all processes), logging to the same W&B run as before.

    Raises:
        ConfigError: a setting cannot work (before training).
        TrainingStoppedError: training stopped on purpose (preemption, non-finite steps, bad data);
            its ``checkpoint`` attribute names the last checkpoint, if any.
    """
    import lightning as L

    from lmim.callbacks import ResumeCheckpoint
    from lmim.resume import checkpoint_exists

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_trainer(cfg)
    set_matmul_precision(cfg.get("matmul_precision"))
    datamodule, module = build(cfg)
    callbacks = build_callbacks(cfg.get("callbacks"))
    keeper = next((cb for cb in callbacks if isinstance(cb, ResumeCheckpoint)), None)
    last = (
        keeper.resume_path
        if keeper is not None
        else Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    )
    # The loggers come after the start is known (the W&B run to continue).
    trainer: L.Trainer = instantiate_checked(cfg.trainer, callbacks=callbacks, logger=False)
    check_strategy(trainer, module)
    check_batches(trainer, datamodule)
    decide = partial(decide_start, cfg, last, module.config)
    start = share("start", decide, trainer_endpoint(trainer))
    ckpt_path = start["ckpt_path"]
    trainer.loggers = build_loggers(cfg.get("logger"), wandb_id=start["wandb_id"])
    if ckpt_path is not None:
        log.info("resuming from %s (step %d)", ckpt_path, start["step"])
        keep_csv_metrics(trainer.loggers)
    exit_code = 1
    try:
        for lg in trainer.loggers:
            lg.log_hyperparams(module.config)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        exit_code = 0
    except TrainingStoppedError as err:
        err.checkpoint = str(last) if checkpoint_exists(last) else None
        raise
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


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("print_config_only"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    try:
        result = train(cfg)
    except ConfigError as err:
        fail(str(err))
    except TrainingStoppedError as err:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            where = getattr(err, "checkpoint", None)
            kept = f" (last checkpoint: {where})" if where else ""
            report(f"{err}{kept}", prefix="lmim: stopped: ")
        sys.exit(err.exit_code)
    if not result["global_zero"]:
        return None
    log.info("done: %s", {k: v for k, v in result.items() if k != "metrics"})
    for key in ("checkpoint", "metrics_csv", "figure"):
        if key in result:
            print(f"{key}: {result[key]}")
    return result["metrics"].get("train/loss")


if __name__ == "__main__":
    main()
