"""bench/bench_generator.py runs on the CPU with the tiny random model and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_generator.py"


def _run(tmp_path, *args):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_sampler_reports_samples_per_second(tmp_path):
    result, stdout = _run(tmp_path, "sampler", "--model", "tiny-random", "--batch", "2", "--m", "2", "--steps", "2",
                          "--warmup", "0", "--iters", "2", "--variants", "base", "deepcache-2")
    assert result["samples_per_s"] > 0 and result["model"] == "tiny-random-sd-32-seed0"
    base, cached = result["variants"]["base"], result["variants"]["deepcache-2"]
    assert len(base["times_s"]) == 2 and base["ratio"] == 1.0 and base["attention"] == "AttnProcessor2_0"
    assert cached["deepcache_interval"] == 2 and cached["samples_per_s"] > 0
    assert "samples/s" in stdout


def test_components_compose_the_per_sample_cost(tmp_path):
    result, _ = _run(tmp_path, "components", "--model", "tiny-random", "--resolution", "32", "--repeats", "1",
                     "--warmup", "0", "--m", "4", "--steps", "5", "--inversion-steps", "5")
    assert len(result["calls"]) == 7 and all(c["median_s"] > 0 for c in result["calls"].values())
    for composed in result["composed"].values():
        assert sum(composed["shares"].values()) == pytest.approx(1.0)
        assert composed["total_s"] == pytest.approx(sum(composed["parts_s"].values()))
        assert composed["total_if_embedding_every_chunk_s"] > composed["total_s"]


def test_an_unknown_variant_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "sampler", "--model", "tiny-random", "--variants", "warp"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown variant 'warp'" in proc.stderr
