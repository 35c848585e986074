"""The one exception type lmim raises for bad configuration or input."""


class ConfigError(ValueError):
    """A configuration value or input that cannot work.

    The message names the config key (as written on the command line, e.g. ``model.mask_ratio``)
    and how to fix it. ``python -m lmim.train`` prints it on one line and exits with status 2
    before anything is trained or written.
    """


class TrainingStoppedError(RuntimeError):
    """Training stopped on purpose before its end; ``python -m lmim.train`` prints the message
    (what happened, what was kept, how to go on) on one line and exits with ``exit_code``.

    Args:
        message: what happened and what to do.
        exit_code: the CLI's exit status.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(TrainingStoppedError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient
    (``optim.max_nonfinite_in_a_row``)."""


class BadDataError(TrainingStoppedError):
    """Too large a share of the training images could not be read (``data.max_skipped_share``)."""


class PreemptedError(TrainingStoppedError):
    """A preemption signal (SIGTERM, SIGUSR1) arrived; ``last.ckpt`` was saved at a step boundary.

    The CLI exits with 128 + the signal number, as a shell reports a process killed by it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, exit_code=128 + int(signum))
        self.signum = int(signum)


class HostSyncError(TrainingStoppedError):
    """A training step read a device value on the host outside a logging step
    (``callbacks.host_sync.strict=true``); the message names the place."""
