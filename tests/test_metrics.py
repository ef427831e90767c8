"""Metrics reach a JSONL file that can be read without W&B, and an offline W&B run."""

import math

from edsam_online.metrics import LoggingConfig, MetricLogger, read_jsonl


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
