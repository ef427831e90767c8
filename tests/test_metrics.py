"""Metrics reach a JSONL file that can be read without W&B, and an offline W&B run."""

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edsam_online.metrics import (
    SAMPLE_COLUMNS,
    SAMPLE_FIELDS,
    SAMPLES_KEY,
    LoggingConfig,
    MetricLogger,
    Progress,
    SampleRow,
    read_jsonl,
)
from edsam_online.wandb_offline import read_run, read_table, records


def test_jsonl_holds_every_logged_metric_and_survives_nan(tmp_path):
    logger = MetricLogger(LoggingConfig(wandb=False), tmp_path, role="producer", rank=1)
    logger.log({"producer/samples_per_s": 12.5, "producer/send_blocked_s": 0.0}, step=1)
    logger.log({"train/loss": math.nan}, step=2)
    logger.close()
    records = read_jsonl(tmp_path / "metrics" / "producer1.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["producer/samples_per_s"] == 12.5
    assert records[0]["role"] == "producer" and records[0]["rank"] == 1
    assert records[1]["train/loss"] == "nan"


def test_offline_wandb_run_folder_is_written_for_trainer_rank0(tmp_path):
    logger = MetricLogger(LoggingConfig(wandb=True, wandb_mode="offline"), tmp_path, role="trainer", rank=0,
                          config={"rho": 0.5})
    logger.log({"train/loss": 1.0}, step=1)
    wandb_dir = logger.wandb_dir
    logger.close()
    assert wandb_dir is not None
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and any(run_dirs[0].glob("*.wandb"))


def _row(seed: int, source: bool = True) -> SampleRow:
    rng = np.random.default_rng(seed)
    return SampleRow(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), f"caption {seed}", 0.25, "producer-0", 3,
                     f"src-{seed}", None, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) if source else None)


def test_a_logged_sample_is_written_beside_its_source_image(tmp_path):
    rows = [_row(0), _row(1, source=False)]
    logger = MetricLogger(LoggingConfig(wandb=False), tmp_path, role="trainer")
    logger.log_samples(rows, step=7)
    logger.close()
    records = read_jsonl(tmp_path / "samples" / "samples.jsonl")
    assert [r["source_image"] for r in records] == ["step_00000007/00_source.png", None]  # under samples/
    with Image.open(tmp_path / "samples" / records[0]["source_image"]) as png:
        assert np.array_equal(np.asarray(png), rows[0].source_image)
    assert records[0]["image"] == "samples/step_00000007/00.png" and records[0]["source_key"] == "src-0"
    assert not (tmp_path / "samples" / "step_00000007" / "01_source.png").exists()


def test_wandb_tables_and_the_checkpoint_artifact_stay_inside_the_run_folder(tmp_path, monkeypatch):
    """Nothing goes to the home folder: a copied run folder holds every file ``wandb sync`` needs."""
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [_row(0), _row(1, source=False)]
    logger = MetricLogger(LoggingConfig(wandb_mode="offline", wandb_checkpoint=True), run_dir, role="trainer")
    logger.log_samples(rows, step=4)
    logger.log_table("eval/table", ["set", "zeroshot_top1", "example"], [["flat", 0.5, rows[0].image]], step=4)
    checkpoint = run_dir / "checkpoints" / "step_00000004.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    assert logger.log_checkpoint(checkpoint, step=4) == "run-trainer0-model"
    assert Path(os.environ["WANDB_DATA_DIR"]).is_relative_to(run_dir)
    folder = Path(logger.wandb_dir)
    logger.close()
    assert "WANDB_DATA_DIR" not in os.environ  # the process's environment is restored
    assert [p for p in home.rglob("*") if p.is_file()] == []
    run = read_run(folder)
    (table,) = read_table(run, SAMPLES_KEY)
    assert table.columns == list(SAMPLE_COLUMNS)
    first, second = table.rows
    assert first["image"].is_relative_to(run_dir) and first["source"].is_relative_to(run_dir)
    with Image.open(first["source"]) as source, Image.open(first["image"]) as image:
        assert np.array_equal(np.asarray(source), rows[0].source_image)
        assert np.array_equal(np.asarray(image), rows[0].image)
    assert second["source"] is None and {k: first[k] for k in SAMPLE_FIELDS} == rows[0].columns()
    (evaluation,) = read_table(run, "eval/table")
    assert evaluation.rows[0]["set"] == "flat" and evaluation.rows[0]["example"].is_relative_to(run_dir)
    (model,) = [r.artifact for r in records(folder) if r.WhichOneof("record_type") == "artifact"
                and r.artifact.type == "model"]
    assert model.name == "run-trainer0-model"
    assert [Path(c.local_path) for c in model.manifest.contents] == [checkpoint]  # referred to, not copied


def test_progress_without_a_terminal_is_whole_lines():
    stream = io.StringIO()
    progress = Progress(total=10, initial=0, every=4, stream=stream)
    for step in range(1, 11):
        progress.update(step, {"train/loss": 2.5, "train/samples_per_s": 40.0, "train/extra_share_actual": 0.5,
                               "train/lr": 1e-3} if step % 5 == 0 else None)
    progress.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and len(lines) == 3
    assert [line.split(" | ")[0] for line in lines] == ["[train] step 4/10 (40%)", "[train] step 8/10 (80%)",
                                                         "[train] step 10/10 (100%)"]
    assert lines[1].split(" | ")[1:5] == ["loss 2.5000", "40.0 samples/s", "extra 0.50", "lr 0.001"]
    assert lines[0].count("|") == 1 and lines[0].endswith(tuple("0123456789"))  # no metric yet: step and ETA
    quiet = io.StringIO()
    off = Progress(total=10, every=0, stream=quiet)
    for step in range(1, 11):
        off.update(step)
    assert quiet.getvalue() == "" and off.bar is None


def test_progress_on_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(total=10, every=4, stream=stream)
    for step in range(1, 11):
        progress.update(step)
    progress.close()
    assert progress.bar is not None and "\r" in stream.getvalue() and "[train]" not in stream.getvalue()
    assert Progress(total=10, every=4, stream=Terminal(), enabled=False).bar is None


def test_bad_logging_settings_name_their_key():
    with pytest.raises(ValueError, match="progress_every"):
        LoggingConfig(progress_every=-1)
    with pytest.raises(ValueError, match="wandb_checkpoint"):
        LoggingConfig(wandb=False, wandb_checkpoint=True)
