"""Reports the unreadable training images the loader skipped, and stops when too many are."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lmim.callbacks.final_step import logs_this_batch
from lmim.errors import BadDataError

log = logging.getLogger("lmim")


class BadDataMonitor(L.Callback):
    """Names, counts and logs (``data/skipped``) the images the training loader skipped.

    The loader (:class:`lmim.data.resumable.ResumableLoader`) replaces an unreadable image by
    the next readable one; this callback collects the skipped files from every process, warns
    once per file, appends them to ``<default_root_dir>/skipped_images.tsv`` (path, reason), and
    raises :class:`BadDataError` when they exceed ``data.max_skipped_share`` of the dataset.
    The list is kept in checkpoints, so a resumed run goes on counting.

    Args:
        every_n_steps: batches between checks across processes (one process checks every
            batch); None = the trainer's ``log_every_n_steps``.
        report: file name of the list, in the trainer's ``default_root_dir``.
    """

    def __init__(self, every_n_steps: int | None = None, report: str = "skipped_images.tsv"):
        self.every_n_steps = every_n_steps
        self.report = report
        self.skipped: dict[str, str] = {}

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = 1 if trainer.world_size == 1 else self.every_n_steps or trainer.log_every_n_steps
        if (batch_idx + 1) % max(1, every) == 0:
            self.check(trainer, pl_module)
        if logs_this_batch(trainer, batch_idx):
            self._log(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)
        self._log(pl_module)

    def _log(self, pl_module: L.LightningModule) -> None:
        # A host tensor: a Python float would be copied to the device each time.
        pl_module.log("data/skipped", torch.tensor(float(len(self.skipped)), dtype=torch.float64))

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather newly skipped files from every process, report them, apply the limit."""
        loader = trainer.train_dataloader
        if not hasattr(loader, "take_skipped"):
            return
        new = loader.take_skipped()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, new)
            new = [item for part in gathered for item in part]
        fresh = {}
        for path, reason in new:
            if path not in self.skipped and path not in fresh:
                fresh[path] = reason
        self.skipped.update(fresh)
        if fresh and trainer.is_global_zero:
            for path, reason in fresh.items():
                log.warning("skipped unreadable image %s (%s)", path, reason)
            report = Path(trainer.default_root_dir) / self.report
            report.parent.mkdir(parents=True, exist_ok=True)
            with open(report, "a") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in fresh.items())
        total = len(loader.dataset)
        limit = float(getattr(trainer.datamodule, "max_skipped_share", 1.0))
        if total and len(self.skipped) / total > limit:
            names = ", ".join(list(self.skipped)[:5]) + (", ..." if len(self.skipped) > 5 else "")
            raise BadDataError(
                f"{len(self.skipped)} of {total} training images ({len(self.skipped) / total:.1%})"
                f" could not be read, more than data.max_skipped_share={limit:g}: {names} (all in "
                f"{Path(trainer.default_root_dir) / self.report}); repair or remove them, or raise "
                "data.max_skipped_share"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = dict(state_dict.get("skipped", {}))
