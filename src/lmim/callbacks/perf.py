"""Throughput and device-hour accounting."""

from __future__ import annotations

import time

import lightning as L
import torch


class PerfMonitor(L.Callback):
    """Logs images/s and the device-hours spent so far.

    ``perf/device_hours`` = wall-clock seconds since the training loop started x number of
    devices (``trainer.world_size``) / 3600, so runs on different clusters share one x-axis.

    Args:
        window: optimizer steps over which images/s is averaged.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = max(1, window)
        self.start: float | None = None
        self.images_seen = 0
        self._marks: list[tuple[float, int]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self._marks = [(self.start, self.images_seen)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.images_seen += int(images.shape[0]) * trainer.world_size
        now = time.perf_counter()
        self._marks.append((now, self.images_seen))
        self._marks = self._marks[-(self.window + 1) :]
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        metrics = {
            "perf/device_hours": (now - self.start) * trainer.world_size / 3600.0,
            "perf/images_seen": float(self.images_seen),
        }
        if t1 > t0:
            metrics["perf/images_per_sec"] = (n1 - n0) / (t1 - t0)
        if torch.cuda.is_available() and images.is_cuda:
            metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images_seen = int(state_dict.get("images_seen", 0))
