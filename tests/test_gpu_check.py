"""bench/gpu_check.sh: the GPU machine's one prepared script works here first, on CPU with tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_script("bench/gpu_check.py")


def _run_check(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_cpu_tiny_mode_passes_its_quick_steps(tmp_path):
    """The steps that take seconds, in the default suite: they exercise the library's API as the
    GPU machine will (the whole check is the slow test below, about 3 minutes here)."""
    out = tmp_path / "out"
    proc = _run_check(out, "--only", "env,loss,trainer")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["step"]: r for r in json.loads((out / "gpu_check.json").read_text())}
    assert list(rows) == ["env", "loss", "trainer"] and all(r["status"] == "PASS" for r in rows.values())
    assert rows["loss"]["result"]["backend"] == "gloo"


@pytest.mark.slow
def test_the_cpu_tiny_mode_passes_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run_check(out, "--stream-seconds", "8")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["step"]: r for r in json.loads((out / "gpu_check.json").read_text())}
    assert list(rows) == ["env", "loss", "trainer", "stream", "sampler"]
    assert all(r["status"] == "PASS" for r in rows.values())
    assert "| sampler | PASS |" in proc.stdout  # the one table
    variants = {v["variant"]: v["samples_per_s"] for v in rows["sampler"]["result"]["rows"]}
    assert set(variants) == {"fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"}
    assert all(v > 0 for v in variants.values())
    modes = {m["mode"]: m for m in rows["trainer"]["result"]["modes"]}
    assert modes["mix"]["synthetic_fill"] > 0 and modes["real"]["synthetic_fill"] == 0
    assert rows["loss"]["result"]["backend"] == "gloo"
    assert rows["stream"]["result"]["received"] > 0 and rows["stream"]["result"]["extra_trained"] > 0


def test_a_hanging_step_is_named_and_fails_the_check(tmp_path, monkeypatch, capsys):
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "_child_cmd",
                        lambda step, args, path: [sys.executable, "-c", "import time; time.sleep(600)"])
    monkeypatch.setattr(gpu_check, "_timeouts", lambda args: dict.fromkeys(gpu_check.STEP_FUNCTIONS, 1))
    args = gpu_check.argparse.Namespace(device="cpu", tiny=True, out=str(tmp_path), only="env,loss", stream_seconds=1)
    assert gpu_check.orchestrate(args) == 1
    out = capsys.readouterr().out
    assert "| env | TIMEOUT (1 s) |" in out and "| loss | TIMEOUT (1 s) |" in out
