"""``last.ckpt`` kept current for resuming: every N steps, at the end, and on preemption."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmim.callbacks.final_step import check_interval, checks_this_step
from lmim.errors import ConfigError, PreemptedError
from lmim.resume import remove_stale_temp_files

log = logging.getLogger("lmim")


def _signal_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    sig = getattr(signal, str(name).upper(), None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigError(
            f"callbacks.last_checkpoint.signals: {name!r} is not a signal that can be caught; "
            "use e.g. [SIGTERM, SIGUSR1]"
        )
    return int(sig)


class ResumeCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, at the end
    of training, and at the first step boundary after a preemption signal.

    Lightning's checkpoint holds the weights, optimizer, lr scheduler, step counters, the data
    loader's position and lmim's RNG states and seeds, so a run resumed from it continues as if
    never stopped. With :class:`lmim.resume.AtomicCheckpointIO` (the default trainer plugin)
    the file is replaced atomically.

    On a signal in ``signals`` (Slurm sends SIGTERM before preempting a job, and with
    ``#SBATCH --signal=USR1@90`` SIGUSR1 before its time limit) every process finishes its
    optimizer step, the processes agree, ``last.ckpt`` is saved and :class:`PreemptedError` is
    raised (``python -m lmim.train`` exits with 128 + the signal number). After SIGUSR1 under
    Slurm with ``requeue``, rank 0 also requeues the job (``scontrol requeue``). During
    training these handlers replace Lightning's own SIGTERM (and Slurm auto-requeue) handlers,
    whose work this does at a step boundary.

    Periodic saves pause while the latest steps had non-finite losses (the module's
    ``nonfinite_streak``), so ``last.ckpt`` stays the last good state.

    Under several processes they agree on a received signal through a collective every
    ``check_every_n_steps`` optimizer steps (a synchronisation with the device under NCCL), so
    the stop comes up to that many steps after the signal; one process checks every step, on
    the host only.

    Args:
        dirpath: checkpoint folder.
        every_n_train_steps: optimizer steps between saves.
        signals: signal names that trigger a save and a clean stop.
        requeue: requeue a Slurm job after a SIGUSR1 save.
        check_every_n_steps: optimizer steps between agreements on a signal under several
            processes; None = ``trainer.log_every_n_steps``.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 500,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
        requeue: bool = True,
        check_every_n_steps: int | None = None,
    ) -> None:
        if int(every_n_train_steps) < 1:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps} must be "
                ">= 1 (optimizer steps between saves of last.ckpt)"
            )
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(every_n_train_steps),
            enable_version_counter=False,
        )
        self.signals = [_signal_number(s) for s in signals]
        self.requeue = bool(requeue)
        self.check_every_n_steps = check_interval(
            "callbacks.last_checkpoint.check_every_n_steps", check_every_n_steps
        )
        self._received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._patched_loop: Any = None

    @property
    def resume_path(self) -> Path:
        """``<dirpath>/last.ckpt``: what a re-run of the same command resumes from."""
        return Path(str(self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            for p in remove_stale_temp_files(self.dirpath):
                log.info("removed %s, a checkpoint a killed process did not finish", p)

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its handlers (Trainer._run), so these take over.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        if int(signal.SIGTERM) in self.signals:
            # Lightning (2.x) broadcasts its own SIGTERM flag before every batch under several
            # processes and reads it on the host: a synchronisation per step. Its flag can no
            # longer be set (the handler above replaced Lightning's), and this callback agrees
            # on SIGTERM itself, so that broadcast is skipped.
            loop = getattr(trainer.fit_loop, "epoch_loop", None)
            if loop is not None and hasattr(loop, "_broadcast_sigterm_tensor"):
                self._patched_loop = loop
                loop._broadcast_sigterm_tensor = lambda: None

    def _restore_handlers(self) -> None:
        # Before Trainer._teardown, which then restores the handlers from before fit().
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}
        loop, self._patched_loop = self._patched_loop, None
        if loop is not None:
            loop.__dict__.pop("_broadcast_sigterm_tensor", None)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def _agreed_signal(self, trainer: L.Trainer, device: torch.device) -> int:
        """The signal any process received (0 if none); a collective under several processes."""
        local = self._received or (int(signal.SIGTERM) if trainer.received_sigterm else 0)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([local], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return int(flag.item())
        return local

    # -- saving ----------------------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Reading the streak synchronises with the device: only where a save is due.
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        if not due or getattr(pl_module, "nonfinite_streak", 0) == 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Stop only after an optimizer step: accumulated gradients are not in checkpoints.
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or (
            batch_idx + 1 == trainer.num_training_batches
        )
        if not stepped or trainer.fast_dev_run:
            return
        if trainer.world_size > 1 and not checks_this_step(trainer, self.check_every_n_steps):
            return
        signum = self._agreed_signal(trainer, pl_module.device)
        if not signum:
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        name = signal.Signals(signum).name
        message = (
            f"{name} received: saved {self.resume_path} at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}); re-run the same command with the same output folder to "
            "resume"
        )
        if signum == signal.SIGUSR1 and self.requeue and trainer.is_global_zero:
            message += self._requeue_slurm_job()
        raise PreemptedError(message, signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        # ModelCheckpoint writes last.ckpt at the end only if it never wrote one; keep it current.
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _requeue_slurm_job() -> str:
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array_job:
            job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        else:
            job = os.environ.get("SLURM_JOB_ID", "")
        if not job:
            return ""
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        except OSError as err:
            return f"; requeueing Slurm job {job} failed ({err})"
        if done.returncode:
            return f"; requeueing Slurm job {job} failed: {done.stderr.strip()}"
        return f"; requeued Slurm job {job}"
