"""Checkpoints that survive crashes, and finding the one to resume from.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin, ``trainer.plugins``) writes a
  checkpoint to a temporary file next to it and renames it over the old one only when complete,
  so a crash (SIGKILL, node failure, full disk) while saving leaves the previous ``last.ckpt``
  intact. Sharded checkpoints (folders, :class:`lmim.fsdp.FSDP2Strategy`) are written into a
  temporary folder and swapped in the same way (:func:`replace_path`).
* :func:`resume_checkpoint` decides what ``python -m lmim.train`` resumes from: ``ckpt_path``
  when given, else ``<output_dir>/checkpoints/last.ckpt`` (a file, or a folder of shards) when
  ``resume=true`` and it exists.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import itertools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import fsspec.utils
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmim.errors import ConfigError

TEMP_MARK = ".tmp-"
# The previous checkpoint, moved aside while a folder replaces it where no atomic exchange exists.
OLD_MARK = ".old-"
# What a sharded checkpoint folder holds besides the shards: loops, data position, schedulers,
# lmim's seeds and RNG states (Lightning's name for it).
META_FILE = _METADATA_FILENAME
_counter = itertools.count()


def temp_path_for(path: Path, mark: str = TEMP_MARK) -> Path:
    """A hidden path next to ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{next(_counter)}")


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


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for p in Path(folder).iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(Path(folder))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the platform or the file system cannot (then nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: Path, dst: Path) -> None:
    """Put ``src`` (a complete file or folder) at ``dst``, whatever ``dst`` is (nothing, a file,
    a folder); readers see the old or the new one, never a mix. The old one is deleted.

    A folder replaces an existing path by an atomic exchange where the file system has one
    (Linux); elsewhere the old one is moved aside first, and :func:`restore_interrupted_replace`
    puts it back if the process died between the two renames.
    """
    src, dst = Path(src), Path(dst)
    if not os.path.lexists(dst):
        os.rename(src, dst)
    elif src.is_file() and not dst.is_dir():
        os.replace(src, dst)
    elif _rename_exchange(src, dst):
        _remove(src)  # now the old one
    else:
        aside = temp_path_for(dst, OLD_MARK)
        os.rename(dst, aside)
        os.rename(src, dst)
        _remove(aside)
    _fsync_dir(dst.parent)


def restore_interrupted_replace(path: str | Path) -> bool:
    """Put back the checkpoint a killed :func:`replace_path` had moved aside, if ``path`` is
    missing because of it. Returns whether it did."""
    path = Path(path)
    if os.path.lexists(path):
        return False
    aside = sorted(
        path.parent.glob(f".{glob.escape(path.name)}{OLD_MARK}*"), key=lambda p: p.stat().st_mtime
    )
    if not aside:
        return False
    try:
        os.rename(aside[-1], path)
    except OSError:  # another process got there first
        return os.path.lexists(path)
    return True


def checkpoint_exists(path: str | Path) -> bool:
    """A checkpoint (a file, or a folder of shards) is at ``path``."""
    return Path(path).exists()


def load_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's training state: a single file memory-mapped (weights not read until
    touched), or a sharded folder's ``meta.pt`` (no weights).

    Raises:
        OSError, RuntimeError, ...: ``path`` is not a readable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


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
            replace_path(tmp, path)  # also over a folder of shards (a run resumed from FSDP)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint files and folders a killed process left in ``folder``
    (after putting back a checkpoint an interrupted :func:`replace_path` had moved aside);
    returns what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for p in folder.glob(f".*{OLD_MARK}*"):
        restore_interrupted_replace(folder / p.name[1:].split(OLD_MARK)[0])
    stale = sorted(folder.glob(f".*{TEMP_MARK}*")) + sorted(folder.glob(f".*{OLD_MARK}*"))
    for p in stale:
        _remove(p)
    return stale


def resume_checkpoint(ckpt_path: str | None, resume: bool, last: Path) -> str | None:
    """The checkpoint a run starts from.

    Args:
        ckpt_path: the ``ckpt_path`` key (an explicit checkpoint wins).
        resume: the ``resume`` key (auto-resume from ``last``).
        last: this run's ``last.ckpt`` (a file, or a folder of shards).

    Raises:
        ConfigError: ``last`` exists but the run would start elsewhere and overwrite it.
    """
    restore_interrupted_replace(last)
    if ckpt_path:
        if checkpoint_exists(last) and Path(ckpt_path).resolve() != last.resolve():
            raise ConfigError(
                f"ckpt_path={ckpt_path} would start this run over in a folder whose {last} holds "
                "another run's progress: pass a new output folder (run_id=NAME or "
                "hydra.run.dir=...), or move that checkpoint away"
            )
        return str(ckpt_path)
    if not checkpoint_exists(last):
        return None
    if resume:
        return str(last)
    raise ConfigError(
        f"resume=false but {last} exists, and starting over would overwrite it: pass a new "
        "output folder (run_id=NAME or hydra.run.dir=...), resume=true to continue it, or move "
        "the checkpoint away"
    )
