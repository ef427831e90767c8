"""Metric logging: one JSONL file per process, plus Weights & Biases (offline by default).

The JSONL files hold exactly what goes to W&B, so a run can be read (and
``buffer-monitor`` can follow it) without W&B. Metric names are grouped by
prefix: ``producer/*``, ``buffer/*``, ``train/*``, ``eval/*``, ``data/*``.

**Step axes.** Every W&B run defines its x axes with ``define_metric`` (:data:`STEP_AXES`):
trainer metrics against ``trainer/step`` (added to every trainer record; it is the JSONL
``step``), producer metrics against ``producer/sent``, which every record holding
``producer/*`` carries (a producer's own records, and the trainer's forwarded ones).

**Samples.** :meth:`MetricLogger.log_samples` logs a few training samples
(:class:`SampleRow`: image, source thumbnail, caption, alpha, producer, age, source key, score)
as the W&B table ``samples/extra`` and as PNG files under ``<run_dir>/samples/step_<step>/``
with one record per row in ``<run_dir>/samples/samples.jsonl`` (docs/metrics.md).

**A self-contained run folder.** W&B stages a table's images (and any artifact's files) under
``$WANDB_DATA_DIR`` (default ``~/.local/share/wandb``) until ``wandb sync`` uploads them, and
keeps its cache and service logs under ``$WANDB_CACHE_DIR`` (``~/.cache/wandb``). While a
:class:`MetricLogger`'s W&B run is open both point into ``<run_dir>/wandb/``, so a copied run
folder syncs with its images (the run's log names the staged files by absolute path: sync it
where it was written, or from a copy at the same path).

**Progress.** :class:`Progress` shows a run's progress on stderr: a tqdm bar on a terminal; in
a log file (``launch.sh`` tees output into one, where a bar's carriage returns would make a
single endless line) a line every ``logging.progress_every`` steps.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TextIO

import numpy as np

from edsam_online.validation import require_at_least

_WANDB_MODES = ("offline", "online", "disabled")

#: W&B x axes: step metric -> the metric globs plotted against it.
STEP_AXES: dict[str, tuple[str, ...]] = {
    "trainer/step": ("train/*", "buffer/*", "eval/*", "data/*", "samples/*"),
    "producer/sent": ("producer/*",),
}
SAMPLES_KEY = "samples/extra"  # the W&B table of logged samples
#: The W&B table's columns: the two images, then :data:`SAMPLE_FIELDS`.
SAMPLE_COLUMNS = ("image", "source", "caption", "alpha", "producer", "age_steps", "source_key", "score")
SAMPLE_FIELDS = SAMPLE_COLUMNS[2:]  # a sample's values, in its table row and its samples.jsonl record
SAMPLES_DIR = "samples"  # under the run folder: step_<step>/<row>.png, <row>_source.png and samples.jsonl
#: Where W&B stages, caches and logs while a logger's run is open, under ``<run_dir>/wandb``.
WANDB_LOCAL_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}


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

    ``progress_every``: where stderr is not a terminal, trainer rank 0 prints a progress line
    every that many steps (0 = never; on a terminal it shows a tqdm bar). ``wandb_checkpoint``:
    the trainer logs its last checkpoint as a W&B artifact of type ``model`` at the end.
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
    progress_every: int = 50
    wandb_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.wandb_mode not in _WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {_WANDB_MODES}, got {self.wandb_mode!r}")
        require_at_least(self, 1, "log_every")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0 (0 = off), got {self.sample_every}")
        require_at_least(self, 1, "sample_rows")
        if self.wandb_checkpoint and (not self.wandb or self.wandb_mode == "disabled"):
            raise ValueError("wandb_checkpoint needs a W&B run: logging.wandb=true and wandb_mode offline or online")
        if self.progress_every < 0:
            raise ValueError(f"progress_every must be >= 0 (0 = off), got {self.progress_every}")


@dataclass
class SampleRow:
    """One logged training sample. ``image``: uint8 ``[H, W, 3]``, as the model trained on it
    (after the training transform). ``alpha``, ``producer``, ``age_steps`` (trainer steps
    between its insertion into the replay buffer and the step that trained on it),
    ``score`` (the producer's fidelity score) and ``source_image`` (uint8 ``[S, S, 3]``, the
    thumbnail of the image it was generated from) are None where unknown: e.g. a sample not
    from the stream, or a producer without a scorer or thumbnails."""

    image: np.ndarray
    caption: str
    alpha: float | None
    producer: str | None
    age_steps: int | None
    source_key: str
    score: float | None
    source_image: np.ndarray | None = None

    def columns(self) -> dict[str, Any]:
        """Its values (:data:`SAMPLE_FIELDS`): every column but the images."""
        return {name: getattr(self, name) for name in SAMPLE_FIELDS}


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
        self._saved_env: dict[str, str | None] = {}
        wants_wandb = cfg.wandb and cfg.wandb_mode != "disabled"
        if wants_wandb and (cfg.wandb_all_ranks or (role == "trainer" and rank == 0)):
            self._wandb_run = self._init_wandb(config)

    def _init_wandb(self, config: Mapping[str, Any] | None):
        import wandb

        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for name, folder in WANDB_LOCAL_DIRS.items():  # restored by close()
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = str((wandb_dir / folder).resolve())
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
        """``rows`` as PNG files (``<row>.png``, and ``<row>_source.png`` for a row with a source
        thumbnail) plus one ``samples.jsonl`` record each (with ``logging.jsonl``), and as the
        W&B table ``samples/extra`` (with a W&B run; its images are made from those files).
        Logging a step again (a rerun after a crash) overwrites its images; its last records
        describe them."""
        if not rows:
            return
        with self._lock:
            images: list[tuple[Any, Any]] = [(row.image, row.source_image) for row in rows]
            if self._file is not None:
                images = self._write_samples(rows, step)
            if self._wandb_run is not None:
                import wandb

                table = wandb.Table(columns=list(SAMPLE_COLUMNS))
                for row, (image, source) in zip(rows, images):
                    table.add_data(wandb.Image(image, caption=row.caption),
                                   None if source is None else wandb.Image(source), *row.columns().values())
                self._wandb_run.log({SAMPLES_KEY: table, "trainer/step": step}, step=step)

    def _write_samples(self, rows: list[SampleRow], step: int) -> list[tuple[str, str | None]]:
        """Write the rows' PNGs and records; returns each row's (image, source image) file paths."""
        from PIL import Image

        samples = self.run_dir / SAMPLES_DIR
        folder = f"step_{step:08d}"
        (samples / folder).mkdir(parents=True, exist_ok=True)
        now = time.time()
        lines, files = [], []
        for i, row in enumerate(rows):
            image = f"{folder}/{i:02d}.png"
            Image.fromarray(row.image).save(samples / image)
            source = None
            if row.source_image is not None:
                source = f"{folder}/{i:02d}_source.png"
                Image.fromarray(row.source_image).save(samples / source)
            files.append((str(samples / image), None if source is None else str(samples / source)))
            lines.append(json.dumps({"step": step, "time": now, "role": self.role, "rank": self.rank, "row": i,
                                     "image": f"{SAMPLES_DIR}/{image}", **row.columns(),
                                     "source_image": source}) + "\n")
        with open(samples / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(lines)
        return files

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """``rows`` as the W&B table ``key`` at trainer ``step`` (a uint8 ``[H, W, 3]`` cell
        becomes an image); nothing without a W&B run."""
        if self._wandb_run is None:
            return
        import wandb

        with self._lock:
            table = wandb.Table(columns=list(columns))
            for row in rows:
                table.add_data(*(wandb.Image(v) if isinstance(v, np.ndarray) else v for v in row))
            self._wandb_run.log({key: table, "trainer/step": step}, step=step)

    def log_checkpoint(self, path: str | os.PathLike, step: int) -> str | None:
        """The checkpoint file ``path`` as the W&B artifact ``<run name>-model`` (type ``model``,
        with its ``step``); returns the artifact's name (None without a W&B run). The artifact
        refers to the file where it is (no copy): keep it until the run is synced."""
        if self._wandb_run is None:
            return None
        import wandb

        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{self._wandb_run.name}-model")
        artifact = wandb.Artifact(name, type="model", metadata={"step": step, "file": Path(path).name})
        artifact.add_file(str(path), policy="immutable")
        with self._lock:
            self._wandb_run.log_artifact(artifact)
        return name

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._wandb_run is not None:
                import wandb

                self._wandb_run.finish()
                # finish() may return before W&B's service has written the run's transaction
                # log; shutting the service down waits for it, so the run folder is complete.
                wandb.teardown()
                self._wandb_run = None
            for name, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved_env = {}


class Progress:
    """A loop's progress from step ``initial`` to ``total`` on ``stream`` (default stderr): a
    tqdm bar where the stream is a terminal, else a line every ``every`` steps and at
    ``total`` (0: none), never a carriage return. ``enabled=False`` shows nothing.

    :meth:`update` is called once per step with the latest logged metrics, when there are
    new ones; a line shows the newest it has seen (``train/loss``, ``train/samples_per_s``,
    ``train/extra_share_actual``, ``train/lr``) and the time left at the run's mean pace.
    """

    _FIELDS = (("train/loss", "loss {:.4f}"), ("train/samples_per_s", "{:.1f} samples/s"),
               ("train/extra_share_actual", "extra {:.2f}"), ("train/lr", "lr {:.3g}"))

    def __init__(self, total: int, initial: int = 0, every: int = 0, stream: TextIO | None = None,
                 enabled: bool = True, desc: str = "train") -> None:
        from tqdm.auto import tqdm

        self.stream = sys.stderr if stream is None else stream
        self.total, self.initial, self.desc = total, initial, desc
        tty = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True) if tty else None
        self.every = every if enabled and not tty else 0
        self.latest: dict[str, Any] = {}
        self._start = time.monotonic()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if metrics:
            self.latest.update({k: metrics[k] for k, _ in self._FIELDS if k in metrics})
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics and "train/loss" in self.latest:
                self.bar.set_postfix(loss=f"{self.latest['train/loss']:.3f}",
                                     extra=f"{self.latest.get('train/extra_share_actual', 0.0):.2f}")
        elif self.every and (step % self.every == 0 or step == self.total):
            self.stream.write(self.line(step) + "\n")
            self.stream.flush()

    def line(self, step: int) -> str:
        """``[train] step 50/600 (8%) | loss 3.2154 | 412.0 samples/s | extra 0.50 | lr 0.0005 | ETA 0:04:31``."""
        parts = [f"[{self.desc}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        parts += [fmt.format(self.latest[k]) for k, fmt in self._FIELDS if isinstance(self.latest.get(k), (int, float))]
        done = step - self.initial
        if done > 0:
            left = (time.monotonic() - self._start) / done * max(self.total - step, 0)
            parts.append(f"ETA {datetime.timedelta(seconds=round(left))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
