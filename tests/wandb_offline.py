"""Read what an offline W&B run recorded, straight from its ``run-<id>.wandb`` file.

wandb ≥ 0.2x writes offline runs only as a transaction log (no ``config.yaml`` or summary JSON
until ``wandb sync``). The log is a LevelDB-style record file: a 7-byte header, 32 KiB blocks,
records with a 7-byte header (crc32c, length, type) whose payloads are ``wandb_internal_pb2.Record``
protobufs, which wandb itself ships. Test-only: proves what W&B stored, not what we meant to log.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    group: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)  # last logged value of every key


def _records(path: Path):
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, payload = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0:  # zero padding to the end of the block
            pos += left - _HEADER
            continue
        payload += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Run id, group, display name, config and last history values of one offline run dir."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.name = record.run.run_id, record.run.run_group, record.run.display_name
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.update({_key(i): json.loads(i.value_json) for i in record.history.item})
    return run
