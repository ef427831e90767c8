"""Metric logging: one JSONL file per process, plus Weights & Biases (offline by default).

The JSONL files hold exactly what goes to W&B, so a run can be read (and
``buffer-monitor`` can follow it) without W&B. Metric names are grouped by
prefix: ``producer/*``, ``buffer/*``, ``train/*``, ``eval/*``, ``data/*``.

**Step axes.** Every W&B run defines its x axes with ``define_metric`` (:data:`STEP_AXES`):
trainer metrics against ``trainer/step`` (added to every trainer record; it is the JSONL
``step``), producer metrics against ``producer/sent``, which every record holding
``producer/*`` carries (a producer's own records, and the trainer's forwarded ones).

**Samples.** :meth:`MetricLogger.log_samples` logs a few training samples
(:class:`SampleRow`: image, caption, alpha, producer, age, source key, score) as the W&B
table ``samples/extra`` and, without W&B, as PNG files under ``<run_dir>/samples/step_<step>/``
with one record per row in ``<run_dir>/samples/samples.jsonl`` (docs/metrics.md).
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

import numpy as np

from edsam_online.validation import require_at_least

_WANDB_MODES = ("offline", "online", "disabled")

#: W&B x axes: step metric -> the metric globs plotted against it.
STEP_AXES: dict[str, tuple[str, ...]] = {
    "trainer/step": ("train/*", "buffer/*", "eval/*", "data/*", "samples/*"),
    "producer/sent": ("producer/*",),
}
SAMPLES_KEY = "samples/extra"  # the W&B table of logged samples
SAMPLE_COLUMNS = ("image", "caption", "alpha", "producer", "age_steps", "source_key", "score")
SAMPLES_DIR = "samples"  # under the run folder: step_<step>/<row>.png and samples.jsonl


@dataclass
class LoggingConfig:
    """Where metrics go.

    ``wandb_mode`` ``offline`` writes a run folder under ``<run_dir>/wandb`` that
    ``wandb sync`` uploads later. Only trainer rank 0 opens a W&B run unless
    ``wandb_all_ranks``; producer metrics reach it forwarded in message headers. Every
    run of one launch joins the W&B ``group`` (default: the run folder's name).

    ``sample_every``: every that many trainer steps (and at the run's last step) trainer
    rank 0 logs up to ``sample_rows`` extra-batch rows it trained on (0 = never). The
    default, 1000, costs one small table per thousand steps at any scale (30 in
    ``paper_cc3m``'s 30000 steps); ``experiment=cpu_demo`` logs every 100 of its 600 steps,
    so its six tables show the buffer's samples from the first minute to the end.
    """

    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_all_ranks: bool = False
    project: str = "edsam-online"
    entity: str | None = None
    group: str | None = None
    log_every: int = 10
    jsonl: bool = True
    sample_every: int = 1000
    sample_rows: int = 16

    def __post_init__(self) -> None:
        if self.wandb_mode not in _WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {_WANDB_MODES}, got {self.wandb_mode!r}")
        require_at_least(self, 1, "log_every")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0 (0 = off), got {self.sample_every}")
        require_at_least(self, 1, "sample_rows")


@dataclass
class SampleRow:
    """One logged training sample. ``image``: uint8 ``[H, W, 3]``, as the model trained on it
    (after the training transform). ``alpha``, ``producer``, ``age_steps`` (trainer steps
    between its insertion into the replay buffer and the step that trained on it) and
    ``score`` (the producer's fidelity score) are None where unknown: e.g. a sample not
    from the stream, or a producer without a scorer."""

    image: np.ndarray
    caption: str
    alpha: float | None
    producer: str | None
    age_steps: int | None
    source_key: str
    score: float | None

    def columns(self) -> dict[str, Any]:
        """Every column but the image."""
        return {name: getattr(self, name) for name in SAMPLE_COLUMNS[1:]}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the file strict JSON: "nan", "inf"
    return value


class MetricLogger:
    """Logs flat ``{name: number}`` dicts to ``<run_dir>/metrics/<role><rank>.jsonl`` and W&B
    (:meth:`log`), and training samples to ``<run_dir>/samples/`` and W&B (:meth:`log_samples`).
    ``config`` becomes the W&B run's config; ``group`` is ``logging.group`` or the run
    folder's name, whatever form (relative, absolute) a role was given it in."""

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
        self.group = cfg.group or self.run_dir.resolve().name  # the same for every role of a launch
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
        run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.group,
            job_type=self.role,
            name=f"{self.run_dir.resolve().name}-{self.role}{self.rank}",
            mode=self.cfg.wandb_mode,
            dir=str(self.run_dir.resolve()),  # absolute: W&B's service process may run in another folder
            config=dict(config) if config else None,
        )
        for step_metric, globs in STEP_AXES.items():
            run.define_metric(step_metric)
            for glob in globs:
                run.define_metric(glob, step_metric=step_metric)
        return run

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
                payload = {k: v for k, v in clean.items() if not isinstance(v, str)}
                if self.role == "trainer":
                    payload["trainer/step"] = step
                self._wandb_run.log(payload, step=step)

    def log_samples(self, rows: list[SampleRow], step: int) -> None:
        """``rows`` as PNG files plus one ``samples.jsonl`` record each (with ``logging.jsonl``)
        and as the W&B table ``samples/extra`` (with a W&B run). Logging a step again (a rerun
        after a crash) overwrites its images; its last records describe them."""
        if not rows:
            return
        with self._lock:
            if self._file is not None:
                self._write_samples(rows, step)
            if self._wandb_run is not None:
                import wandb

                table = wandb.Table(columns=list(SAMPLE_COLUMNS))
                for row in rows:
                    table.add_data(wandb.Image(row.image, caption=row.caption), *row.columns().values())
                self._wandb_run.log({SAMPLES_KEY: table, "trainer/step": step}, step=step)

    def _write_samples(self, rows: list[SampleRow], step: int) -> None:
        from PIL import Image

        folder = Path(SAMPLES_DIR) / f"step_{step:08d}"
        (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
        now = time.time()
        lines = []
        for i, row in enumerate(rows):
            image = folder / f"{i:02d}.png"
            Image.fromarray(row.image).save(self.run_dir / image)
            lines.append(json.dumps({"step": step, "time": now, "role": self.role, "rank": self.rank, "row": i,
                                     "image": image.as_posix(), **row.columns()}) + "\n")
        with open(self.run_dir / SAMPLES_DIR / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(lines)

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
