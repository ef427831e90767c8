"""Metric logging: one JSONL file per process, plus Weights & Biases (offline by default).

The JSONL files hold exactly what goes to W&B, so a run can be read (and
``buffer-monitor`` can follow it) without W&B. Metric names are grouped by
prefix: ``producer/*``, ``buffer/*``, ``train/*``, ``eval/*``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

_WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggingConfig:
    """Where metrics go.

    ``wandb_mode`` ``offline`` writes a run folder under ``<run_dir>/wandb`` that
    ``wandb sync`` uploads later. Only trainer rank 0 opens a W&B run unless
    ``wandb_all_ranks``; producer metrics reach it forwarded in message headers.
    """

    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_all_ranks: bool = False
    project: str = "edsam-online"
    entity: str | None = None
    group: str | None = None
    log_every: int = 10
    jsonl: bool = True

    def __post_init__(self) -> None:
        if self.wandb_mode not in _WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {_WANDB_MODES}, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the file strict JSON: "nan", "inf"
    return value


class MetricLogger:
    """Logs flat ``{name: number}`` dicts to ``<run_dir>/metrics/<role><rank>.jsonl`` and W&B."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: str | os.PathLike,
        role: str,
        rank: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.role = role
        self.rank = rank
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._file = None
        self.path: Path | None = None
        if cfg.jsonl:
            self.path = self.run_dir / "metrics" / f"{role}{rank}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._wandb_run = None
        wants_wandb = cfg.wandb and cfg.wandb_mode != "disabled"
        if wants_wandb and (cfg.wandb_all_ranks or (role == "trainer" and rank == 0)):
            self._wandb_run = self._init_wandb(config)

    def _init_wandb(self, config: Mapping[str, Any] | None):
        import wandb

        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.cfg.group or self.run_dir.name,
            job_type=self.role,
            name=f"{self.run_dir.name}-{self.role}{self.rank}",
            mode=self.cfg.wandb_mode,
            dir=str(self.run_dir),
            config=dict(config) if config else None,
        )

    @property
    def wandb_dir(self) -> str | None:
        """The offline run folder to pass to ``wandb sync`` (None without W&B)."""
        return None if self._wandb_run is None else str(Path(self._wandb_run.dir).parent)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with self._lock:
            if self._file is not None:
                record = {"step": step, "time": time.time(), "role": self.role, "rank": self.rank, **clean}
                self._file.write(json.dumps(record) + "\n")
            if self._wandb_run is not None:
                self._wandb_run.log({k: v for k, v in clean.items() if not isinstance(v, str)}, step=step)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._wandb_run is not None:
                self._wandb_run.finish()
                self._wandb_run = None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file; a torn last line (file still being written) is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
