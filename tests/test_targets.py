"""bench/targets.py: the PASS/MISS verdicts of bench/run_all.sh, from the benchmarks' JSON files."""

from __future__ import annotations

import json

from _scripts import load_script


def _targets():
    return load_script("bench/targets.py")


def _arm(wall, **extra):
    return {"wall_s": wall, "startup_s": 10.0, "train_s": wall - 20.0, "eval_end_s": 10.0, "steps": 100, **extra}


def _online_offline(ratio, online_wall):
    """What bench_online_offline.py writes: N samples, one run per arm."""
    return json.dumps({"n": 3600, "ratio": ratio, "runs": {
        "online": [_arm(online_wall, producer_samples_per_s=20.0)],
        "offline": [_arm(100.0, generate_s=30.0, generate_samples_per_s=120.0)]}})


def test_a_missed_target_fails_with_its_profile_and_missing_files_are_unmeasured(tmp_path, capsys):
    (tmp_path / "online_offline.json").write_text(_online_offline(0.9, 90.0))
    for i, growth in enumerate((0.01, 0.02, 0.09), 1):
        (tmp_path / f"memory_{i}.json").write_text(json.dumps({"summary": {
            "growth": growth, "rss_start_mib": 100, "rss_end_mib": 100 * (1 + growth), "rss_max_mib": 110,
            "buffer_bytes_vs_capacity_items": 1.0}}))
    assert _targets().main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "| 0.900 (median of 1) | MISS |" in out
    assert "startup 10 + generate 30 + train steps 80" in out  # the profile under the table
    assert "700 ms per step on its one thread (800 offline" in out and "samples in 180 s" in out
    assert "| +2.00% (median of 3: +1.00%, +2.00%, +9.00%) | PASS |" in out  # the median decides
    assert "| 1.000 x capacity x item bytes (max of 3) | PASS |" in out
    assert "unmeasured (no gpu_check_gpu/gpu_check.json)" in out


def test_every_target_met_exits_zero(tmp_path, capsys):
    (tmp_path / "online_offline.json").write_text(_online_offline(0.6, 60.0))
    (tmp_path / "gpu_check_tiny").mkdir()
    (tmp_path / "gpu_check_tiny" / "gpu_check.json").write_text(json.dumps(
        [{"step": "env", "status": "PASS", "seconds": 1, "result": {}}]))
    assert _targets().main([str(tmp_path)]) == 0
    assert "| 1 of 1 steps pass | PASS |" in capsys.readouterr().out
