"""Checkpoints at device-time budget points, for evaluating one run at several budgets."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lmim.callbacks.final_step import check_interval, checks_this_step
from lmim.callbacks.perf import PerfMonitor
from lmim.errors import ConfigError


class BudgetCheckpoints(L.Callback):
    """Save the weights when the run has spent each of ``minutes`` of device time, and stop at
    the last one.

    Device time is :class:`PerfMonitor`'s ``perf/device_hours`` (wall-clock since setup x
    devices) when that callback is present, else this callback's own clock from setup; under
    several processes rank 0's clock decides, so all save and stop at the same step. Files:
    ``<dirpath>/budget_start.ckpt`` (the initialisation, before the first step), one
    ``budget_<m>min.ckpt`` per point reached, ``budget_end.ckpt`` (the weights training ended
    with: the last point, or ``max_steps`` if that came first), and ``points.json`` listing each
    file with its device-hours and step. Checkpoints hold weights only (``weights_only=True``),
    which :func:`lmim.export.load_pretrainer` reads.

    Under several processes rank 0's decision is broadcast every ``check_every_n_steps``
    optimizer steps (a collective, a synchronisation with the device under NCCL), so a point
    is saved up to that many steps late; one process checks its clock every step.

    Args:
        dirpath: folder for the checkpoints and ``points.json``.
        minutes: budget points in device-minutes, increasing.
        stop_at_last: stop training once the last point is saved (a time budget).
        check_every_n_steps: optimizer steps between checks under several processes; None =
            ``trainer.log_every_n_steps``.
    """

    def __init__(
        self,
        dirpath: str,
        minutes: Sequence[float],
        stop_at_last: bool = True,
        check_every_n_steps: int | None = None,
    ) -> None:
        points = [float(m) for m in minutes]
        if not points or any(m <= 0 for m in points) or points != sorted(set(points)):
            raise ConfigError(
                f"callbacks.budget.minutes={list(minutes)}: give increasing positive minutes"
            )
        self.dirpath = Path(dirpath)
        self.minutes = points
        self.stop_at_last = stop_at_last
        self.check_every_n_steps = check_interval(
            "callbacks.budget.check_every_n_steps", check_every_n_steps
        )
        self.saved: list[dict] = []
        self._next = 0
        self._t0: float | None = None
        self._perf: PerfMonitor | None = None

    def _hours(self) -> float:
        if self._perf is not None:
            return self._perf.device_hours
        return (time.perf_counter() - (self._t0 or time.perf_counter())) / 3600.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._t0 = time.perf_counter()
            self._perf = next((c for c in trainer.callbacks if isinstance(c, PerfMonitor)), None)

    def _save(self, trainer: L.Trainer, name: str, minutes: float | None) -> None:
        path = self.dirpath / f"budget_{name}.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
        if not trainer.is_global_zero:
            return
        entry = {
            "name": name,
            "path": str(path),
            "budget_minutes": minutes,
            "device_hours": self._hours(),
            "step": trainer.global_step,
        }
        self.saved = [e for e in self.saved if e["name"] != name] + [entry]
        tmp = self.dirpath / "points.json.tmp"
        tmp.write_text(json.dumps(self.saved, indent=1))
        tmp.replace(self.dirpath / "points.json")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._save(trainer, "start", 0.0)

    def _reached(self, trainer: L.Trainer, device: torch.device, minutes: float) -> bool:
        """Rank 0's clock decides for every process (a collective under several processes):
        each one's own clock could reach the point at another step, and saving or stopping on
        some processes only would deadlock."""
        reached = self._hours() * 60.0 >= minutes
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            if not checks_this_step(trainer, self.check_every_n_steps):
                return False
            flag = torch.tensor([reached], dtype=torch.uint8, device=device)
            torch.distributed.broadcast(flag, src=0)
            return bool(flag.item())
        return reached

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._next >= len(self.minutes):
            return
        minutes = self.minutes[self._next]
        if not self._reached(trainer, pl_module.device, minutes):
            return
        self._save(trainer, f"{minutes:g}min", minutes)
        self._next += 1
        if self._next == len(self.minutes) and self.stop_at_last:
            trainer.should_stop = True
            if self._perf is not None:  # Lightning writes this stopping step's metrics
                self._perf.log_step(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "end", None)
