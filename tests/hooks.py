"""Test hooks loaded into real runs through the config (``+callbacks.x._target_=tests.hooks...``).

They inject faults from the outside (a PyTorch forward hook on the model) or record what the real
training did; no lmim or Lightning code is replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import lightning as L
import torch


class NaNLoss(L.Callback):
    """Makes the model's loss NaN at the given optimizer steps, or at every step from ``start``.

    Args:
        steps: optimizer steps (``trainer.global_step`` during the forward) to poison.
        start: poison every step from this one on.
        how: ``mul`` (loss x NaN: the gradients are NaN too) or ``add`` (loss + NaN: the
            gradients stay finite, only the loss is not).
    """

    def __init__(
        self, steps: Sequence[int] = (), start: int | None = None, how: str = "mul"
    ) -> None:
        self.steps = {int(s) for s in steps}
        self.start = start
        self.how = how
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        pl_module.net.register_forward_hook(self._poison)

    def _poison(self, module, args, out):
        step = self._trainer.global_step
        if module.training and (
            step in self.steps or (self.start is not None and step >= self.start)
        ):
            nan = float("nan")
            loss = out.loss * nan if self.how == "mul" else out.loss + nan
            return dataclasses.replace(out, loss=loss)
        return out


class WeightChanges(L.Callback):
    """Records, per optimizer step, whether the step changed the weights (in-process runs).

    ``WeightChanges.changed`` maps the global step (before the update) to True/False.
    """

    changed: dict[int, bool] = {}

    def __init__(self) -> None:
        WeightChanges.changed = {}
        self._before: torch.Tensor | None = None

    @staticmethod
    def _flat(pl_module: L.LightningModule) -> torch.Tensor:
        return torch.cat([p.detach().flatten().float() for p in pl_module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._flat(pl_module).clone()
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        WeightChanges.changed[self._step] = not torch.equal(self._before, self._flat(pl_module))


class RecordMasks(L.Callback):
    """Saves the masks each process trained with, by optimizer step, to
    ``<dirpath>/masks_rank<global rank>.pt`` at the end of training (a forward pre-hook on the
    model records the mask it is called with).

    Args:
        dirpath: where the files go.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.masks: dict[int, torch.Tensor] = {}
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        pl_module.net.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if module.training and len(args) > 1:
            self.masks[self._trainer.global_step] = args[1].detach().cpu().clone()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pathlib import Path

        path = Path(self.dirpath) / f"masks_rank{trainer.global_rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.masks, path)


class ShiftDeviceClock(L.Callback):
    """Puts one process's :class:`lmim.callbacks.PerfMonitor` clock ``hours`` ahead (through
    its checkpoint state, as a resumed run's earlier device-hours): a process whose clock
    disagrees with rank 0's.

    Args:
        rank: the global rank whose clock moves.
        hours: device-hours added.
    """

    def __init__(self, rank: int, hours: float) -> None:
        self.rank = rank
        self.hours = hours

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lmim.callbacks import PerfMonitor

        if trainer.global_rank == self.rank:
            perf = next(c for c in trainer.callbacks if isinstance(c, PerfMonitor))
            state = perf.state_dict()
            perf.load_state_dict({**state, "device_hours": state["device_hours"] + self.hours})
