"""Which steps do what: the last optimizer step of a run is logged whatever
``trainer.log_every_n_steps`` is; metrics are computed only on the steps Lightning writes; the
processes of a run agree (signals, budget points) every ``check_every_n_steps``."""

from __future__ import annotations

from typing import Any

import lightning as L

from lmim.errors import ConfigError


def is_final_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended (``on_train_batch_end``) finished the run's last
    optimizer step: ``trainer.max_steps`` reached, or the last batch of the last epoch."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    return batch_idx + 1 >= trainer.num_training_batches


def logs_this_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning writes the step metrics of the batch that just ended
    (``on_train_batch_end``): it finished an optimizer step that is a multiple of
    ``trainer.log_every_n_steps``, or training stops there (``should_stop`` as set so far, the
    run's last step, ``fast_dev_run``). Metrics logged on other batches are never written, so
    lmim computes them only here."""
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    if (batch_idx + 1) % accumulate and batch_idx + 1 != trainer.num_training_batches:
        return False  # accumulating: no optimizer step, Lightning writes nothing
    if trainer.fast_dev_run:
        return True
    every = int(trainer.log_every_n_steps)
    if every <= 0:
        return False
    return (
        trainer.global_step % every == 0 or trainer.should_stop or is_final_step(trainer, batch_idx)
    )


def check_interval(key: str, every: int | None) -> int | None:
    """A callback's ``check_every_n_steps`` setting: None (``trainer.log_every_n_steps``) or a
    positive number of optimizer steps."""
    if every is not None and int(every) < 1:
        raise ConfigError(
            f"{key}={every} must be >= 1 (optimizer steps between the processes' checks), or "
            "null (trainer.log_every_n_steps)"
        )
    return None if every is None else int(every)


def checks_this_step(trainer: L.Trainer, every: int | None) -> bool:
    """Whether the processes check together after this optimizer step: every ``every`` steps
    (None: ``trainer.log_every_n_steps``). The collective is a synchronisation with the device
    under NCCL, so it does not run on every step."""
    return trainer.global_step % (every or max(1, int(trainer.log_every_n_steps))) == 0


class FinalStepLog(L.Callback):
    """Make the final optimizer step's metrics (``train/loss``, per-tap losses, ``lr``,
    ``perf/*``) reach the loggers even when ``trainer.log_every_n_steps`` does not divide it,
    so that a run shorter than ``log_every_n_steps`` still has a loss curve.

    Lightning writes a batch's step metrics after every ``on_train_batch_end`` hook has run,
    when the step is a multiple of ``log_every_n_steps`` or ``trainer.should_stop`` is set (and
    then flushes the loggers). This callback sets ``should_stop`` on the batch that ends
    training anyway, so that batch's row, with the other callbacks' values, is written. Nothing
    else changes: the loop stops there in any case.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch, batch_idx
    ) -> None:
        if is_final_step(trainer, batch_idx):
            trainer.should_stop = True
