"""End to end on CPU: torchrun trainer ranks (gloo) with a producer process streaming over ZeroMQ."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from edsam_online.buffer import ReplayBuffer
from edsam_online.config import load_config
from edsam_online.loader import MixConfig, MixedLoader
from edsam_online.metrics import read_jsonl
from edsam_online.models import create_clip
from edsam_online.runtime import RuntimeConfig, free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# tiny everything: 32 px, small batches, no W&B, a cheap eval
COMMON = [
    "logging.wandb=false",
    "logging.log_every=2",
    "trainer.progress=false",
    "runtime.num_workers=1",
    "runtime.prefetch=1",
    "optim.warmup_steps=2",
    "optim.lr=5e-4",
    "eval.samples_per_class=2",
    "eval.linear_probe=false",
    "eval.domains=[flat]",
    "data.length=512",
    "diffusion=tiny_random",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(cmd, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _trainer(nproc: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """``nproc`` ranks under torchrun; 1 runs the same entry point without torchrun (faster start)."""
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    return _start([*launcher, "-m", "consumers.train", *COMMON, *overrides], log)


def _producer(endpoint: str, run_dir: Path, log: Path, rank: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "producers", *COMMON, f"run_dir={run_dir}", f"stream.endpoints=[{endpoint}]",
           f"producer.rank={rank}", "producer.batch_size=2", "logging.log_every=1000"]
    return _start(cmd, log)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        with_group = os.getpgid(proc.pid)
        os.killpg(with_group, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            proc.wait(10)


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail(f"timed out; log:\n{log.read_text()[-4000:]}")
    assert code == 0, f"exit {code}; log:\n{log.read_text()[-4000:]}"


def _train_logs(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "metrics" / f"trainer{rank}.jsonl"
    return [r for r in read_jsonl(path) if "train/loss" in r] if path.exists() else []


def _keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    path = run_dir / "keys" / f"trainer{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["step"]: r["real"] for r in map(json.loads, lines)}


def _uninterrupted_keys(args: list[str], steps: int, world: int) -> list[dict[int, list[str]]]:
    """Each rank's real-data keys of ``steps`` steps, read from the same config's loader without a stop."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = load_config(compose("config", overrides=[*COMMON, *args]))
    _, transform, _, tokenizer = create_clip(cfg.model)
    real, syn = cfg.mix.real_batch_size(cfg.trainer.batch_size), cfg.mix.extra_batch_size(cfg.trainer.batch_size)
    out = []
    for rank in range(world):
        loader = MixedLoader(cfg.data, transform, tokenizer, real, syn, ReplayBuffer(cfg.buffer),
                             mix=MixConfig(extra_wait_s=0.0), runtime=RuntimeConfig(num_workers=1, prefetch=1),
                             rank=rank, world_size=world)
        it = iter(loader)
        out.append({step: next(it).real_keys for step in range(1, steps + 1)})
    return out


def test_sigterm_leaves_a_checkpoint_at_the_current_step_and_resume_matches_an_uninterrupted_run(tmp_path):
    """A preempted job (SIGTERM to every process, as launch.sh or SLURM send it): both ranks
    finish their step, agree on it, checkpoint there and exit 0; resuming reaches the last step
    with exactly the real-data keys of a run that was never stopped (no producer: every synthetic
    slot falls back to real data, so the keys are known in advance), the ranks' shards disjoint
    and the run's counters carried across the stop."""
    from edsam_online.checkpoint import list_checkpoints

    dead = f"tcp://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    steps = 60
    args = [f"stream.endpoints=[{dead}]", f"trainer.steps={steps}", "trainer.batch_size=4", "mix.extra_share=0.5",
            "mix.extra_wait_s=0", "trainer.record_keys=true", "eval.every_steps=0", f"run_dir={run_dir}"]
    log = tmp_path / "a.log"
    proc = _trainer(2, args, log)
    try:
        deadline = time.monotonic() + 180
        while len(_keys(run_dir, 0)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        proc.wait(120)  # torchrun itself exits 1 when signalled; its workers end cleanly
    finally:
        _stop(proc, signal.SIGKILL)
    stopped = max(_keys(run_dir, 0))
    assert 3 <= stopped < steps, "the run ended before the signal could interrupt it"
    assert max(_keys(run_dir, 1)) == stopped  # every rank stopped after the same step
    assert [p.name for p in list_checkpoints(run_dir)][-1] == f"step_{stopped:08d}.pt"
    text = log.read_text()
    assert all(f"rank {r} stopped at step {stopped} of {steps}" in text for r in (0, 1)), text[-4000:]
    # the only traceback is torchrun's own SignalException: no worker failed
    assert text.count("Traceback (most recent call last)") == text.count("SignalException: Process"), text[-4000:]

    _wait(_trainer(2, [*args, "checkpoint.resume=latest"], tmp_path / "b.log"), 180, tmp_path / "b.log")
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}.pt'} at step {stopped}" in \
        (tmp_path / "b.log").read_text()
    for rank, keys in enumerate(_uninterrupted_keys(args, steps, 2)):
        assert _keys(run_dir, rank) == keys
    assert not set(sum(_keys(run_dir, 0).values(), [])) & set(sum(_keys(run_dir, 1).values(), []))
    last = _train_logs(run_dir, 0)[-1]
    assert last["step"] == steps and last["train/steps_without_extra"] == steps  # counted across the stop


def test_training_survives_a_producer_crash_and_uses_a_restarted_one(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    procs = {"p1": _producer(endpoint, run_dir, tmp_path / "p1.log")}
    log = tmp_path / "trainer.log"

    def latest():
        logs = _train_logs(run_dir, 0)
        return logs[-1] if logs else None

    def wait_until(pred, what, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = latest()
            if rec is not None and pred(rec):
                return rec
            assert procs["trainer"].poll() is None, f"trainer exited; log:\n{log.read_text()[-4000:]}"
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}; last: {latest()}")

    try:
        procs["trainer"] = _trainer(1, [f"run_dir={run_dir}", f"stream.endpoints=[{endpoint}]",
                                        "trainer.steps=100000", "trainer.batch_size=4", "mix.extra_share=0.5",
                                        "mix.extra_wait_s=0.05", "logging.log_every=1",
                                        "buffer.min_size_to_sample=1", "buffer.max_times_sampled=1",
                                        "buffer.samples_per_insert=0"], log)
        before = wait_until(lambda r: r["train/extra_samples"] > 0, "synthetic samples")
        os.killpg(os.getpgid(procs["p1"].pid), signal.SIGKILL)
        procs["p1"].wait(10)
        down = wait_until(lambda r: r["train/steps_without_extra"] > before["train/steps_without_extra"] + 3,
                          "real-data fallback steps after the crash")
        assert down["train/extra_fallback_samples"] > before["train/extra_fallback_samples"]
        procs["p2"] = _producer(endpoint, run_dir, tmp_path / "p2.log")
        wait_until(lambda r: r["train/extra_samples"] > down["train/extra_samples"], "synthetic samples again")
        assert all(math.isfinite(r["train/loss"]) for r in _train_logs(run_dir, 0))
    finally:
        for proc in procs.values():
            _stop(proc)
