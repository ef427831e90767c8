"""Read an offline W&B run back without syncing it: its config, group, step axes, history
and logged tables (with their image files).

An offline run folder (``<run_dir>/wandb/offline-run-*``) keeps everything in one
transaction log, ``run-<id>.wandb``: LevelDB's log format (32 KiB blocks of checksummed
chunks) behind a 7-byte W&B header, each entry one protobuf ``Record`` of
``wandb.proto.wandb_internal_pb2``. wandb's own Python reader of that file was dropped when
its Go core took over (``wandb sync`` reads it in Go), and no other library parses it, so
the ~30 lines of framing are written here; the records themselves are parsed by wandb's
protobuf classes. Used by the tests and ``scripts/wandb_samples.py``.

A logged ``wandb.Table`` becomes a ``run_table`` artifact whose files (the table JSON and
its images) W&B stages under ``$WANDB_DATA_DIR/artifacts/staging`` (default
``~/.local/share/wandb``; :class:`~edsam_online.metrics.MetricLogger` points it into the run
folder) until ``wandb sync`` uploads them; the run folder's
``files/media/table/*.table.json`` keeps the rows without their images. :func:`read_table`
follows the log's artifact manifest to the staged files.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC = b":W&B", 0xBEE1
_CHUNK = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CLIENT_ARTIFACT = "wandb-client-artifact://"


def transaction_log(run_folder: str | Path) -> Path:
    """The ``run-<id>.wandb`` file of an offline run folder."""
    logs = sorted(Path(run_folder).glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no *.wandb transaction log in {run_folder}: is it an offline W&B run folder?")
    return logs[0]


def records(run_folder: str | Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of an offline run, in the order they were written
    (a record torn by a crash at the end is left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = transaction_log(run_folder).read_bytes()
    ident, magic, _ = _HEADER.unpack_from(data)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{transaction_log(run_folder)} is not a W&B transaction log")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        start = pos + _CHUNK.size
        if start + length > len(data):
            break
        pending = data[start:start + length] if kind in (_FULL, _FIRST) else pending + data[start:start + length]
        pos = start + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _nest(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


@dataclass
class OfflineRun:
    """What an offline run logged. ``metrics``: the ``define_metric`` calls, each
    ``{"name" or "glob": ..., "step_metric": ...}``; ``history``: one dict per ``log`` step
    (nested values, e.g. a table's ``{"_type": "table-file", ...}``); ``artifacts``: per
    artifact client id, its manifest (``path`` in the artifact -> staged file)."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    job_type: str = ""
    name: str = ""
    metrics: list[dict[str, str]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)

    def step_metric(self, name: str) -> str | None:
        """The x axis ``define_metric`` gave ``name`` (an exact name first, then the first glob)."""
        from fnmatch import fnmatchcase

        for m in self.metrics:
            if m.get("name") == name:
                return m.get("step_metric") or None
        for m in self.metrics:
            if "glob" in m and fnmatchcase(name, m["glob"]):
                return m.get("step_metric") or None
        return None


def read_run(run_folder: str | Path) -> OfflineRun:
    """Config, group, job type, step axes, history and artifact manifests of an offline run."""
    run = OfflineRun(Path(run_folder))
    for record in records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.group, run.job_type, run.name = r.run_group, r.job_type, r.display_name
            for item in r.config.update:
                _nest(run.config, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _nest(run.config, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "metric":
            m = record.metric
            entry = {"name": m.name} if m.name else {"glob": m.glob_name}
            run.metrics.append({**entry, "step_metric": m.step_metric})
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _nest(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            run.history.append(row)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts[a.client_id] = {c.path: c.local_path for c in a.manifest.contents}
    run.config.pop("_wandb", None)
    return run


@dataclass
class LoggedTable:
    """One logged ``wandb.Table``: its step and rows (column -> value; an image cell is
    the path of its staged PNG file)."""

    step: int
    columns: list[str]
    rows: list[dict[str, Any]]


def read_table(run: OfflineRun, key: str) -> list[LoggedTable]:
    """Every table logged under ``key``, in order, with image cells as staged file paths.
    Raises FileNotFoundError when the staged files are gone (e.g. after ``wandb sync``)."""
    tables = []
    for row in run.history:
        cell = row.get(key)
        if not isinstance(cell, dict) or cell.get("_type") != "table-file":
            continue
        client_id, _, entry = cell["artifact_path"].removeprefix(_CLIENT_ARTIFACT).partition("/")
        manifest = run.artifacts.get(client_id)
        if manifest is None or entry not in manifest:
            raise FileNotFoundError(f"the artifact of table {key!r} at step {row.get('_step')} is not in the log")
        staged = Path(manifest[entry])
        if not staged.is_file():
            raise FileNotFoundError(f"{staged} (table {key!r}) is gone: staged files are removed once synced")
        table = json.loads(staged.read_text())
        columns = table["columns"]
        rows = []
        for values in table["data"]:
            cells = {}
            for column, value in zip(columns, values):
                if isinstance(value, dict) and value.get("_type") == "image-file":
                    value = Path(manifest[value["path"]])
                cells[column] = value
            rows.append(cells)
        tables.append(LoggedTable(int(row.get("_step", -1)), columns, rows))
    return tables
