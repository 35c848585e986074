"""Read a W&B run's transaction log (``run-<id>.wandb``) without the W&B servers.

Every W&B run, offline or online, writes its records to ``wandb/<offline->run-<time>-<id>/
run-<id>.wandb`` before anything is uploaded; ``wandb sync`` uploads that file. The file is a
7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by a LevelDB-style log: 32 KiB blocks
of chunks, each chunk ``crc32 (4, little endian) | length (2) | type (1) | data``, where the type
says whether the chunk is a whole record (1) or its first (2), middle (3) or last (4) part, and the
CRC is zlib's crc32 of the type byte and the data. Each record is a
``wandb.proto.wandb_internal_pb2.Record``. wandb itself has no public reader for these files.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log, or is damaged before its end."""


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield the serialised records of a ``.wandb`` file, in order.

    A partial record at the end (a run still writing, or killed) is dropped; a damaged chunk
    (bad CRC or type) anywhere before that raises :class:`WandbFileError`.
    """
    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise WandbFileError(f"{path}: not a W&B run file (no ':W&B' header)")
    pos, parts = len(_HEADER), None
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # the writer pads a block's tail that cannot hold a header
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        start, pos = pos + _CHUNK.size, pos + _CHUNK.size + length
        if kind == 0 and length == 0:  # zero padding
            continue
        if pos > len(data):
            return  # truncated tail
        chunk = data[start:pos]
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise WandbFileError(f"{path}: bad checksum at byte {start - _CHUNK.size}")
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind in (_MIDDLE, _LAST) and parts is not None:
            parts.append(chunk)
            if kind == _LAST:
                yield b"".join(parts)
                parts = None
        else:
            raise WandbFileError(f"{path}: unexpected chunk type {kind} at byte {start - 7}")


@dataclass
class WandbRunFile:
    """What a ``.wandb`` file says about its run.

    Attributes:
        path: the file.
        run_id, name, group, project, job_type: from the run record.
        tags: the run's tags.
        config: the run config (top-level keys; values decoded from JSON).
        history: one dict per ``wandb.log`` row, in order (``_step``, ``_runtime`` and
            ``_timestamp`` included).
        summary: the final summary values.
        metrics: ``define_metric`` records: name (or glob) -> {"step_metric", "glob", ...}.
        exit_code: the run's exit code, None if it did not finish.
    """

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    exit_code: int | None = None


def _key(item) -> str:
    return "/".join(item.nested_key) if len(item.nested_key) else item.key


def _value(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except json.JSONDecodeError:
        return value_json


def _config_update(config: dict[str, Any], items) -> None:
    for item in items:
        key = _key(item)
        if key != "_wandb":
            config[key] = _value(item.value_json)


def read_wandb_file(path: str | Path) -> WandbRunFile:
    """Decode a run's ``.wandb`` file: run info, config, history rows, summary and metrics."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRunFile(path=Path(path))
    for raw in iter_records(path):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except Exception as err:  # protobuf's DecodeError
            raise WandbFileError(f"{path}: undecodable record ({err})") from err
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group = r.run_id, r.display_name, r.run_group
            run.project, run.job_type, run.tags = r.project, r.job_type, list(r.tags)
            _config_update(run.config, r.config.update)
        elif kind == "config":
            _config_update(run.config, record.config.update)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            run.history.append({_key(i): _value(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item.value_json)
        elif kind == "metric":
            m = record.metric
            name = m.name or m.glob_name
            run.metrics[name] = {
                "glob": bool(m.glob_name),
                "step_metric": m.step_metric,
                "step_sync": m.options.step_sync,
            }
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
