"""scripts/launch.sh: what it starts (--dry-run), and end to end: per-producer CURVE keys admit only allowed
producers; a producer that dies is restarted or, past its cap, does not stop the job; a trainer that fails
stops it and says how to resume; SIGTERM, to the script or to the whole job, checkpoints every rank at
one step, exits 0 and says how to resume."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _scripts import load_script
from _streaming_helpers import wait_for

from test_trainer_dist import COMMON, _env, _stop, _train_logs

from edsam_online.checkpoint import list_checkpoints
from edsam_online.metrics import read_jsonl
from edsam_online.runtime import free_port
from edsam_online.security import generate_keys

ROOT = Path(__file__).resolve().parents[1]
SOAK = load_script("bench/soak.py")  # finds a launch's trainer ranks and every process of its job


def _dry_run(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/launch.sh", "--dry-run", "--run-dir", str(tmp_path / "run"), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)


def test_dry_run_shows_overrides_added_to_the_embedded_experiment_and_starts_nothing(tmp_path):
    out = _dry_run(tmp_path, "trainer.steps=5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" -m ")[-1].split()[0] for line in lines] == ["producers.prepare", "producers", "consumers.train"]
    for line in lines:  # every role gets the demo, then the user's override (which wins)
        assert line.index("experiment=cpu_demo") < line.index("trainer.steps=5"), line
    assert "experiment=cpu_demo (the embedded default" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    tiny = _dry_run(tmp_path, "diffusion=tiny_random")  # each producer builds it: no prepare step
    assert [line.split(" -m ")[-1].split()[0] for line in tiny.stdout.splitlines()] == ["producers", "consumers.train"]


def test_a_named_experiment_or_none_replaces_the_embedded_one(tmp_path):
    out = _dry_run(tmp_path, "~experiment", "method=none", "trainer.steps=5")
    assert out.returncode == 0, out.stderr
    assert "experiment=cpu_demo" not in out.stdout and "\\~experiment method=none trainer.steps=5" in out.stdout
    assert len(out.stdout.splitlines()) == 1  # method=none: no producer, only the trainers


def test_a_missing_cuda_device_stops_the_launch_before_anything_starts(tmp_path):
    out = _dry_run(tmp_path, "--producer-devices", "99", "trainer.steps=5")
    assert out.returncode == 2 and out.stdout == ""
    assert "CUDA device '99'" in out.stderr and "does not exist" in out.stderr


STREAMING = ["trainer.batch_size=4", "mix.extra_share=0.5", "mix.extra_wait_s=0.05", "buffer.min_size_to_sample=1",
             "buffer.samples_per_insert=0", "buffer.max_times_sampled=1", "producer.batch_size=2", "producer.threads=1",
             "runtime.threads=1"]


def _launch(run_dir: Path, out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "scripts/launch.sh", "--base-port", str(free_port()), "--run-dir", str(run_dir), *args,
         "~experiment", *COMMON, *STREAMING],
        cwd=ROOT, env=_env(), stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _sessions(run_dir: Path, key: str = "buffer/sessions") -> int:
    path = run_dir / "metrics" / "trainer0.jsonl"
    return max((r.get(key, 0) for r in read_jsonl(path)), default=0) if path.exists() else 0


def test_per_producer_curve_keys_let_only_allowed_producers_deliver_and_a_kill_9_restart_keeps_its_key(tmp_path):
    """launch.sh --curve-keys: each producer rank gets its own secret key; the trainers hear only
    the allowed one (producer-0) and refuse producer-1's handshakes. Producer 0 killed with
    kill -9 is restarted with its key and the trainer hears its new session."""
    keys = tmp_path / "keys"
    generate_keys(keys, ["producer-0"])
    generate_keys(keys, ["producer-1"], allow=False)  # a key pair the trainers do not know
    out = _dry_run(tmp_path, "--producers", "2", "--curve-keys", str(keys), "trainer.steps=5")
    secrets = re.findall(r"stream.curve_client_secret=(\S+)", out.stdout)
    assert secrets == [str(keys / "producers" / f"producer-{r}.key_secret") for r in (0, 1)], out.stdout
    missing = _dry_run(tmp_path, "--producers", "3", "--curve-keys", str(keys), "trainer.steps=5")
    assert missing.returncode == 2 and "producer-2.key_secret is missing" in missing.stderr

    run_dir, log = tmp_path / "run", tmp_path / "launch.out"
    launch = _launch(run_dir, log, "--producers", "2", "--curve-keys", str(keys), "trainer.steps=100000")
    try:
        heard = wait_for(lambda: _sessions(run_dir) and _sessions(run_dir, "buffer/auth_failures"), 240, 0.2)
        assert heard, log.read_text()[-4000:]
        assert _sessions(run_dir) == 1, log.read_text()[-4000:]  # producer-0 only
        os.kill(int(re.search(r"producer 0: pid (\d+)", log.read_text()).group(1)), signal.SIGKILL)
        assert wait_for(lambda: _sessions(run_dir) >= 2, 240, 0.2), log.read_text()[-4000:]
        step = _train_logs(run_dir, 0)[-1]["step"]  # 20 more steps: room for a third session, if one could come
        assert wait_for(lambda: _train_logs(run_dir, 0)[-1]["step"] >= step + 20, 120, 0.2), log.read_text()[-4000:]
        text = log.read_text()
        assert _sessions(run_dir) == 2, text[-4000:]  # the restarted producer is a new session of rank 0, no more
        assert "producer 0 exited (status 137); restart 1 of 5 in 1 s" in text
        assert len(re.findall(r"producer 0: pid \d+", text)) == 2 and len(re.findall(r"producer 1: pid \d+", text)) == 1
        assert "restart 1 of 5" in (run_dir / "logs" / "producer0.log").read_text()
        restarts = [json.loads(line) for line in (run_dir / "metrics" / "launch.jsonl").read_text().splitlines()]
        assert [r["launch/producer_restarts"] for r in restarts] == [1]
    finally:
        _stop(launch)


def test_a_failed_trainer_stops_the_launch_and_prints_the_resume_command(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "launch.out"
    launch = _launch(run_dir, out, "trainer.steps=100000", "checkpoint.every=2")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list((run_dir / "checkpoints").glob("step_*.pt")):
            time.sleep(0.2)
        os.kill(next(iter(SOAK.trainer_ranks(run_dir))), signal.SIGKILL)  # the rank dies after its first checkpoint
        assert launch.wait(120) != 0
        text = out.read_text()
        assert "a trainer rank failed" in text, text[-4000:]
        resume = text.split("continue the run from its last checkpoint with:")[1].strip().splitlines()[0]
        assert resume.startswith("scripts/launch.sh ") and resume.endswith(f"--run-dir {run_dir} checkpoint.resume=latest")
        assert "trainer.steps=100000" in resume  # the failed launch's own arguments, then the resume
        producer_pid = int(re.search(r"producer 0: pid (\d+)", text).group(1))
        try:  # every rank is stopped: the producer is gone too
            os.kill(producer_pid, 0)
            assert False, "the producer outlived the launch"
        except ProcessLookupError:
            pass
    finally:
        _stop(launch)


def test_a_launch_stopped_by_its_config_makes_nothing_and_suggests_no_resume(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "launch.out"
    launch = _launch(run_dir, out, "trainer.steps=5", f"checkpoint.resume={tmp_path / 'missing.pt'}")
    assert launch.wait(120) == 2
    text = out.read_text()
    assert text.strip().splitlines()[-1] == f"config error: checkpoint.resume: no file at '{tmp_path / 'missing.pt'}'"
    assert "checkpoint.resume=latest" not in text and not run_dir.exists()


@pytest.mark.slow  # launch.sh's restarts are in the default suite above; bench/soak.py kills producers for an hour
def test_kill_9_of_the_producer_past_its_restart_cap_leaves_the_trainer_running_to_its_last_step(tmp_path):
    run_dir, steps = tmp_path / "run", 150
    out = tmp_path / "launch.out"
    launch = _launch(run_dir, out, "--producer-restarts", "0", f"trainer.steps={steps}")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launch.poll() is None:
            logs = _train_logs(run_dir, 0)
            if logs and logs[-1]["train/extra_samples"] > 0:
                break
            time.sleep(0.2)
        before = _train_logs(run_dir, 0)[-1]
        assert before["step"] < steps, "the trainer finished before the producer could be killed"
        producer_pid = int(re.search(r"producer 0: pid (\d+)", out.read_text()).group(1))
        os.kill(producer_pid, signal.SIGKILL)
        assert launch.wait(300) == 0, out.read_text()[-4000:]
    finally:
        _stop(launch)
    text = out.read_text()
    assert "producer 0 exited (status 137) after 0 restarts; the trainers go on without it" in text
    assert len(re.findall(r"producer 0: pid \d+", text)) == 1 and not (run_dir / "metrics" / "launch.jsonl").exists()
    after = _train_logs(run_dir, 0)
    assert after[-1]["step"] == steps
    assert after[-1]["train/steps_without_extra"] > before["train/steps_without_extra"]  # trained on the fallback
    assert "zero-shot" in text


def _signal_at_step(launch: subprocess.Popen, run_dir: Path, out: Path, step: int, pids) -> None:
    """Once trainer rank 0 has logged ``step``, SIGTERM to each of ``pids(launch.pid)``."""
    deadline = time.monotonic() + 240
    while not (_train_logs(run_dir, 0) and _train_logs(run_dir, 0)[-1]["step"] >= step):
        assert time.monotonic() < deadline and launch.poll() is None, out.read_text()[-4000:]
        time.sleep(0.1)
    for pid in pids(launch.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _stopped_at(text: str, steps: int, ranks: int, run_dir: Path) -> int:
    """The step every rank checkpointed at, as launch.sh and the ranks report it; checks the
    checkpoint and the printed resume command."""
    stopped = int(re.search(r"stopped by SIGTERM; every trainer rank checkpointed at step_(\d+)\.pt", text).group(1))
    assert 2 <= stopped < steps, "the run ended before the signal could interrupt it"
    assert all(f"rank {r} stopped at step {stopped} of {steps}" in text for r in range(ranks)), text[-4000:]
    assert list_checkpoints(run_dir)[-1].name == f"step_{stopped:08d}.pt"
    assert "launch.sh: continue the run from its last checkpoint with:" in text
    return stopped


def test_sigterm_to_launch_sh_checkpoints_exits_0_and_its_resume_command_runs_to_the_end(tmp_path):
    """TERM to launch.sh alone: the rank finishes its step and checkpoints, torchrun ends with it
    (status 0, no traceback), the producer stops, launch.sh exits 0 with the resume command; that
    command continues from the checkpoint to the last step, past a newer one that does not load."""
    run_dir, out, steps = tmp_path / "run", tmp_path / "launch.out", 30
    launch = _launch(run_dir, out, f"trainer.steps={steps}")
    try:
        _signal_at_step(launch, run_dir, out, 2, lambda pid: [pid])
        assert launch.wait(120) == 0, out.read_text()[-4000:]
    finally:
        _stop(launch)
    text = out.read_text()
    stopped = _stopped_at(text, steps, 1, run_dir)
    assert "Traceback" not in text, text[-4000:]
    assert "SIGTERM received: producer producer-0 stops" in (run_dir / "logs" / "producer0.log").read_text()
    resume = text.split("continue the run from its last checkpoint with:")[1].strip().splitlines()[0]
    assert resume.startswith("scripts/launch.sh --base-port ") and f"trainer.steps={steps}" in resume
    assert resume.endswith(f"--run-dir {run_dir} checkpoint.resume=latest"), resume

    garbage = run_dir / "checkpoints" / "step_99999999.pt"
    garbage.write_bytes(b"not a checkpoint")
    resumed = subprocess.run(["bash", "-c", resume], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300, start_new_session=True)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-4000:]
    assert f"skipping {garbage}, which does not load" in text
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}.pt'} at step {stopped}" in text
    assert _train_logs(run_dir, 0)[-1]["step"] == steps and "zero-shot" in text
    # the producers stopped, launch.sh prints the run's whole ledger: both launches, every process ended
    assert "sample ledger (2 producer and 2 trainer processes): " in text and "no final record" not in text


def test_sigterm_to_every_process_of_the_job_checkpoints_every_rank_at_the_same_step(tmp_path):
    """TERM to every process at once (launch.sh's group, the producer, torchrun and its ranks:
    scancel, preemption): both ranks checkpoint at one step and launch.sh exits 0."""
    run_dir, out, steps = tmp_path / "run", tmp_path / "launch.out", 100000
    launch = _launch(run_dir, out, "--trainers", "2", f"trainer.steps={steps}")
    try:
        _signal_at_step(launch, run_dir, out, 2, SOAK.job_processes)
        assert launch.wait(120) == 0, out.read_text()[-4000:]
    finally:
        _stop(launch)
    text = out.read_text()
    _stopped_at(text, steps, 2, run_dir)
    assert "Traceback" not in (run_dir / "logs" / "producer0.log").read_text()
