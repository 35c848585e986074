"""Counts the host synchronisations of each training step: reads of tensor values by the host.

A GPU runs ahead of the Python loop only while the host never waits for a result. Every read
of a device value (``.item()``, ``.tolist()``, ``.cpu()``, ``if tensor:``, ``float(tensor)``)
and every op whose output size depends on the data (``nonzero``, boolean indexing, ``unique``)
stalls the host until the queued kernels finish. lmim's step makes none between logging steps;
this callback shows it, on any device.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmim.callbacks.final_step import is_final_step
from lmim.errors import ConfigError, HostSyncError

log = logging.getLogger("lmim")

# ATen ops that read a value on the host or size their output by the data. ``.item()``,
# ``bool()``, ``float()`` and ``int()`` all reach ``_local_scalar_dense``, from Python or C++.
SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
# Python methods that read values without an ATen op on CPU tensors (they copy on GPUs).
SYNC_METHODS = ("tolist", "cpu", "numpy")
# Frames of host-side work that reads CPU tensors by design (augmentations, samplers, the loader
# when it runs in the training process), not device values.
HOST_SIDE = ("torch/utils/data/", "/lmim/data/", "torchvision/", "/PIL/")


@dataclass
class HostSync:
    """One host synchronisation: the step it happened in, what it was and where (the innermost
    frame outside torch)."""

    step: int
    kind: str
    where: str


def _caller() -> tuple[str, bool]:
    """The innermost frame outside torch, and whether the call comes from host-side data work."""
    frames = traceback.extract_stack()[:-3]
    host_side = any(any(h in f.filename for h in HOST_SIDE) for f in frames)
    for f in reversed(frames):
        if "/torch/" not in f.filename and not f.filename.endswith("host_sync.py"):
            return f"{f.filename}:{f.lineno} ({f.name})", host_side
    return "torch", host_side


class _Recorder(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if not name.startswith("aten."):
            name = f"aten.{name}"
        sized = name == "aten.repeat_interleave" and (kwargs or {}).get("output_size")
        if name in SYNC_OPS and not sized:
            self.record(name, args)
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager recording host synchronisations, attributed to ``step`` (set by the
    caller as it goes).

    It sees the ops of the thread it is entered in (the autograd engine's threads inherit it),
    not the loader's worker processes. On CUDA it counts only reads of CUDA tensors. On a CPU,
    where every tensor is a host tensor, it counts reads of any tensor except float64 scalars
    (how lmim keeps logged numbers on the host: on a GPU those reads wait for nothing) and
    reads made by host-side data work (:data:`HOST_SIDE` frames: augmentations, samplers; on a
    GPU their tensors are CPU tensors, not counted).

    Args:
        device_type: the training device's type; on "cpu" every tensor read counts.
    """

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.events: list[HostSync] = []
        self.step = -1
        self.paused = False
        self._mode = _Recorder(self._record)
        self._saved: dict[str, Any] = {}

    def _counts(self, args: Any) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self.device_type != "cpu":
            return any(t.device.type != "cpu" for t in tensors)
        # On a CPU every tensor is a host tensor; lmim's host values (logged numbers) are
        # float64 scalars, which the step never computes in.
        return not tensors or any(t.dtype != torch.float64 or t.dim() for t in tensors)

    def _record(self, kind: str, args: Any) -> None:
        if self.paused or not self._counts(args):
            return
        where, host_side = _caller()
        # On a GPU a read of a device tensor waits wherever it comes from (lmim.data included).
        if not host_side or self.device_type != "cpu":
            self.events.append(HostSync(self.step, kind, where))

    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)
        counter = self

        def method(tensor, *args, **kwargs):
            counter._record(f"Tensor.{name}", (tensor,))
            return original(tensor, *args, **kwargs)

        method.__name__ = name
        return original, method

    def __enter__(self) -> HostSyncCounter:
        for name in SYNC_METHODS:
            original, method = self._wrap(name)
            self._saved[name] = original
            setattr(torch.Tensor, name, method)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def by_step(self) -> Counter:
        """Synchronisations per step."""
        return Counter(e.step for e in self.events)


class HostSyncMonitor(L.Callback):
    """Counts the host synchronisations of every training step (see :class:`HostSyncCounter`)
    and reports those outside the steps where they are expected: logging steps (every
    ``trainer.log_every_n_steps``), checkpoint saves, the last step of an epoch (epoch-end
    callbacks) and the final step.

    At the end of training it logs a summary (syncs per step on each kind of step, and the
    places of unexpected ones) and writes it to ``<default_root_dir>/<report>`` (rank 0;
    other ranks add ``.rank<r>``): the summary, the count of every step and each unexpected
    synchronisation with its place. With ``strict`` the first unexpected one stops the run
    (:class:`HostSyncError`, naming the place); on CUDA it also turns on
    ``torch.cuda.set_sync_debug_mode("error")`` for those steps' batches, which catches
    synchronisations no op shows (stream syncs, blocking copies). It slows every op (a Python
    hook on each), so it is a diagnostic (``callbacks=sync_check``), not for timed runs.

    Args:
        strict: stop at an unexpected synchronisation instead of counting it.
        report: file name of the report in the trainer's ``default_root_dir``.
    """

    def __init__(self, strict: bool = False, report: str = "host_syncs.json") -> None:
        self.strict = bool(strict)
        self.report = report
        self.counter = HostSyncCounter()
        self.expected: set[int] = set()
        self.seen: set[int] = set()
        self._active = False

    def _expected_step(self, trainer: L.Trainer, step: int) -> bool:
        every = max(1, int(trainer.log_every_n_steps))
        saves = [
            c._every_n_train_steps
            for c in trainer.checkpoint_callbacks
            if getattr(c, "_every_n_train_steps", 0)
        ]
        return (step + 1) % every == 0 or any((step + 1) % n == 0 for n in saves)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "compile_options", None) is not None:
            raise ConfigError(
                "callbacks.host_sync counts the syncs of eager steps (its op hook stops "
                "torch.compile): set compile.enabled=false for this check"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counter.device_type = pl_module.device.type
        self.counter.paused = True
        self.counter.__enter__()
        self._active = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counter.step = trainer.global_step
        if self._expected_step(trainer, trainer.global_step):
            self.expected.add(trainer.global_step)
        elif self.strict and pl_module.device.type == "cuda":
            # CUDA's own check as well: any synchronising call (a copy to the host, a stream
            # or device sync) raises where it happens, until the batch's end.
            torch.cuda.set_sync_debug_mode("error")
        self.counter.paused = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self.seen.add(self.counter.step)
        if is_final_step(trainer, batch_idx):
            self.expected.add(self.counter.step)
        if self.strict:
            bad = self.unexpected()
            if bad:
                self._stop()
                raise HostSyncError(
                    f"host synchronisation at step {bad[0].step}, not a logging step: "
                    f"{bad[0].kind} at {bad[0].where} (callbacks.host_sync.strict=true)"
                )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch-end work (pictures, k-NN, epoch metrics) reads values once an epoch: expected.
        self.expected.add(self.counter.step)

    def unexpected(self) -> list[HostSync]:
        """The synchronisations on steps where none is expected."""
        return [e for e in self.counter.events if e.step not in self.expected]

    def summary(self) -> dict[str, float]:
        """Synchronisations per step: on the steps where they are expected and on the others."""
        per = self.counter.by_step()
        expected = [s for s in sorted(self.seen) if s in self.expected]
        others = [s for s in sorted(self.seen) if s not in self.expected]
        return {
            "host_syncs_per_logging_step": sum(per[s] for s in expected) / max(1, len(expected)),
            "host_syncs_per_other_step": sum(per[s] for s in others) / max(1, len(others)),
            "other_steps": float(len(others)),
        }

    def _stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        if self._active:
            self.counter.__exit__(None, None, None)
            self._active = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()
        s = self.summary()
        rank = trainer.global_rank
        name = self.report if rank == 0 else f"{self.report}.rank{rank}"
        path = Path(trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        per = self.counter.by_step()
        path.write_text(
            json.dumps(
                {
                    "summary": s,
                    "device": pl_module.device.type,
                    "log_every_n_steps": int(trainer.log_every_n_steps),
                    "per_step": {str(i): per[i] for i in sorted(self.seen)},
                    "expected_steps": sorted(self.expected),
                    "unexpected": [asdict(e) for e in self.unexpected()],
                },
                indent=1,
            )
        )
        places = Counter(f"{e.kind} at {e.where}" for e in self.unexpected())
        log.info(
            "host synchronisations: %.1f per logging step, %.2f per other step (%d steps)%s",
            s["host_syncs_per_logging_step"],
            s["host_syncs_per_other_step"],
            int(s["other_steps"]),
            "".join(f"\n  {n} x {p}" for p, n in places.most_common(10)),
        )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()
