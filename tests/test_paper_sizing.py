"""bench/paper_sizing.py: the sizing of a paper-scale run follows its composed config, and the
online / offline projection is the overlap it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _sizing():
    return load_script("bench/paper_sizing.py")


def test_online_overlaps_generation_and_training_offline_runs_them_in_turn():
    # 100 samples at 1/s on 2 producer GPUs = 50 s; 300 images at 3/s on 1 trainer GPU = 100 s.
    p = _sizing().project_online_offline(gen_rate=1.0, train_rate=3.0, distinct=100, images=300,
                                         producer_gpus=2, trainer_gpus=1)
    assert p["generate_s"] == pytest.approx(50.0) and p["train_s"] == pytest.approx(100.0)
    assert p["online_s"] == pytest.approx(100.0)
    assert p["offline_dedicated_s"] == pytest.approx(150.0)
    assert p["offline_pooled_s"] == pytest.approx((50 * 2 + 100 * 1) / 3)  # 200 GPU-seconds over 3 GPUs


def test_the_sizing_reads_the_experiment_and_sizes_its_reuse(tmp_path):
    out = tmp_path / "sizing.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "paper_sizing.py"), "--json", str(out),
                    "experiment=paper_cc3m", "buffer.samples_per_insert=10"], check=True, cwd=tmp_path,
                   capture_output=True)
    d = json.loads(out.read_text())
    rows = {r["samples_per_insert"]: r for r in d["rows"]}
    assert d["config_spi"] == 10.0 and 10.0 in rows  # the override, not the YAML's 20
    # Producer GPUs per trainer GPU scale as 1 / reuse, and the balanced row needs exactly one.
    assert rows[10.0]["producers_per_trainer"] * 10 == pytest.approx(rows[2.0]["producers_per_trainer"] * 2)
    balanced = [r for r in d["rows"] if r["producers_per_trainer"] == pytest.approx(1.0)]
    assert len(balanced) == 1 and balanced[0]["projection"]["online_s"] == pytest.approx(
        balanced[0]["projection"]["offline_pooled_s"])
    assert d["per_sample"]["unet_rows"] == pytest.approx(10 / 10 + 10 * 2)  # M = 10, 10 + 10 guided steps
