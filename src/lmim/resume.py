"""Checkpoints that survive crashes, and finding the one to resume from.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin, ``trainer.plugins``) writes a
  checkpoint to a temporary file next to it and renames it over the old one only when complete,
  so a crash (SIGKILL, node failure, full disk) while saving leaves the previous ``last.ckpt``
  intact.
* :func:`resume_checkpoint` decides what ``python -m lmim.train`` resumes from: ``ckpt_path``
  when given, else ``<output_dir>/checkpoints/last.ckpt`` when ``resume=true`` and it exists.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import fsspec.utils
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmim.errors import ConfigError

TEMP_MARK = ".tmp-"
_counter = itertools.count()


def temp_path_for(path: Path) -> Path:
    """A hidden file next to ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{next(_counter)}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, fsync, then an atomic rename onto the target.

    Readers (a resuming run, an exporter) see either the previous complete file or the new
    complete file, never a partial one. Remote paths (``s3://``...) are written by Lightning's
    default writer; object stores publish objects atomically.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
        try:
            # O_EXCL: never write through someone else's file; 0o666 & umask like open().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary checkpoint files a killed process left in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def resume_checkpoint(ckpt_path: str | None, resume: bool, last: Path) -> str | None:
    """The checkpoint a run starts from.

    Args:
        ckpt_path: the ``ckpt_path`` key (an explicit checkpoint wins).
        resume: the ``resume`` key (auto-resume from ``last``).
        last: this run's ``last.ckpt``.

    Raises:
        ConfigError: ``last`` exists but the run would start elsewhere and overwrite it.
    """
    if ckpt_path:
        if last.is_file() and Path(ckpt_path).resolve() != last.resolve():
            raise ConfigError(
                f"ckpt_path={ckpt_path} would start this run over in a folder whose {last} holds "
                "another run's progress: pass a new output folder (run_id=NAME or "
                "hydra.run.dir=...), or move that checkpoint away"
            )
        return str(ckpt_path)
    if not last.is_file():
        return None
    if resume:
        return str(last)
    raise ConfigError(
        f"resume=false but {last} exists, and starting over would overwrite it: pass a new "
        "output folder (run_id=NAME or hydra.run.dir=...), resume=true to continue it, or move "
        "the checkpoint away"
    )
