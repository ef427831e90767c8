"""scripts/slurm/edsam.sbatch: which node runs what, as SLURM would start it (scontrol, srun and
python replaced by stand-ins that print what they are given); the time limit's USR1 and
preemption's TERM stop the steps, a USR1 requeues the job, and a requeued job resumes."""

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hydra.core.override_parser.overrides_parser import OverridesParser

from edsam_online.security import generate_keys

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "edsam.sbatch"


def _bin(tmp_path: Path) -> Path:
    """A PATH folder with scontrol (host list -> names) and python (records its arguments, one
    line per call written at once: producers.sh starts its producers concurrently)."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && tr , "\\n" <<< "$3"\n')
    (b / "python").write_text('#!/bin/bash\nline=$(printf "CUDA_VISIBLE_DEVICES=%q " "$CUDA_VISIBLE_DEVICES"; '
                              'printf "%q " "$@")\necho "$line" >> "$CALLS"\n')
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def _dry_run(tmp_path: Path, nodes: str, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST=nodes,
               SLURM_GPUS_PER_NODE="a100:2", SLURM_JOB_ID="7", EDSAM_DRY_RUN="1",
               EDSAM_RUN_DIR=str(tmp_path / "run"), CALLS=str(tmp_path / "calls"), **env)
    return subprocess.run(["bash", str(SBATCH), "experiment=paper_cc3m", "trainer.steps=10"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_producer_nodes_bind_trainer_nodes_connect_to_every_producer_by_host_name(tmp_path):
    out = _dry_run(tmp_path, "gpu1,gpu2,gpu3,gpu4")
    assert out.returncode == 0, out.stderr
    prepare, producers, trainers = [shlex.split(line) for line in out.stdout.splitlines()]
    assert prepare[:3] == ["python", "-m", "producers.prepare"] and "experiment=paper_cc3m" in prepare
    assert producers[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=gpu1,gpu2"]
    assert trainers[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=gpu3,gpu4"]
    torchrun = trainers[5:trainers.index("consumers.train") - 1]
    assert torchrun == ["python", "-m", "consumers.torchrun", "--nnodes", "2", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu3:29400"]
    endpoints = [f"tcp://{h}:{p}" for h in ("gpu1", "gpu2") for p in (5555, 5556)]
    assert trainers[-1] == "stream.endpoints=[" + ",".join(f"'{e}'" for e in endpoints) + "]"
    assert (tmp_path / "run" / "endpoints.txt").read_text().split() == endpoints  # for separate jobs
    OverridesParser.create().parse_overrides(trainers[trainers.index("consumers.train") + 1:])  # Hydra takes them

    # What the producer step runs on the second producer node: its two producers, one per GPU.
    step = producers[producers.index("bash"):]
    assert step[:7] == ["bash", "scripts/slurm/producers.sh", "2", "4", "5555", str(tmp_path / "run"), ""]
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_NODEID="1",
               CALLS=str(tmp_path / "calls"))
    (tmp_path / "run" / "logs").mkdir(parents=True, exist_ok=True)
    subprocess.run(step, cwd=ROOT, env=env, check=True, timeout=60)
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    assert len(calls) == 2
    for gpu, call in enumerate(calls):
        words = shlex.split(call)
        assert words[0] == f"CUDA_VISIBLE_DEVICES={gpu}" and words[1:3] == ["-m", "producers"]
        assert f"stream.endpoints=['tcp://*:{5555 + gpu}']" in words and "producer.endpoint_index=0" in words
        assert f"producer.rank={2 + gpu}" in words and "producer.num_producers=4" in words
        assert "trainer.steps=10" in words and "diffusion.device=cuda" in words
        assert not any(w.startswith("stream.curve_client_secret") for w in words)
        OverridesParser.create().parse_overrides(words[3:])


def test_curve_keys_give_every_producer_rank_its_own_pair(tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys, [f"producer-{r}" for r in range(4)])
    out = _dry_run(tmp_path, "gpu1,gpu2,gpu3", EDSAM_PRODUCER_NODES="2", EDSAM_CURVE_KEYS=str(keys))
    assert out.returncode == 0, out.stderr
    producers = shlex.split(out.stdout.splitlines()[1])
    trainers = shlex.split(out.stdout.splitlines()[2])
    assert f"stream.curve_allow_dir={keys}/allowed" in trainers and "stream.curve=true" in trainers
    assert "--nnodes" in trainers and trainers[trainers.index("--nnodes") + 1] == "1"
    step = producers[producers.index("bash"):]
    assert step[6] == str(keys)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_NODEID="0",
               CALLS=str(tmp_path / "calls"))
    (tmp_path / "run" / "logs").mkdir(parents=True, exist_ok=True)
    subprocess.run(step, cwd=ROOT, env=env, check=True, timeout=60)
    secrets = sorted(w for call in (tmp_path / "calls").read_text().splitlines() for w in shlex.split(call)
                     if w.startswith("stream.curve_client_secret="))
    assert secrets == [f"stream.curve_client_secret={keys}/producers/producer-{r}.key_secret" for r in (0, 1)]


def test_an_allocation_without_trainer_nodes_is_refused(tmp_path):
    out = _dry_run(tmp_path, "gpu1,gpu2", EDSAM_PRODUCER_NODES="2")
    assert out.returncode == 2 and "no producer or no trainer node" in out.stderr


def _live_bin(tmp_path: Path) -> Path:
    """_bin, plus an srun whose step waits for TERM and records it (the trainer step then exits 1,
    as torchrun does when signalled, the producer step 0) and an scontrol that records a requeue."""
    b = _bin(tmp_path)
    (b / "scontrol").write_text('#!/bin/bash\ncase "$1" in\n  show) tr , "\\n" <<< "$3" ;;\n'
                                '  requeue) echo "requeue $2" >> "$CALLS" ;;\nesac\n')
    (b / "srun").write_text('#!/bin/bash\nrole=producers code=0\n'
                            '[[ " $* " == *" consumers.torchrun "* ]] && role=trainers code=1\n'
                            'sleep 600 & nap=$!\n'
                            'trap \'kill $nap; echo "$role TERM" >> "$CALLS"; exit $code\' TERM\n'
                            'touch "$CALLS.$role"\nwait $nap\n')
    (b / "srun").chmod(0o755)
    return b


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_the_time_limit_signal_stops_every_step_and_requeues_preemption_only_stops(tmp_path, sig, requeued):
    calls = tmp_path / "calls"
    env = dict(os.environ, PATH=f"{_live_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu1,gpu2",
               SLURM_GPUS_PER_NODE="1", SLURM_JOB_ID="7", EDSAM_SYSTEM_PYTHON="1",
               EDSAM_RUN_DIR=str(tmp_path / "run"), CALLS=str(calls))
    job = subprocess.Popen(["bash", str(SBATCH), "trainer.steps=10"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (Path(f"{calls}.trainers").exists() and Path(f"{calls}.producers").exists()):
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0]
            time.sleep(0.05)
        job.send_signal(sig)
        out = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    recorded = calls.read_text().splitlines()
    assert "trainers TERM" in recorded and "producers TERM" in recorded  # both steps stopped cleanly
    assert ("requeue 7" in recorded) == requeued, out
    assert f"SIG{sig.name[3:]}: the trainers stopped (status 1)" in out


def test_the_sbatch_file_asks_for_requeue_and_a_signal_before_the_limit_and_a_requeued_job_resumes(tmp_path):
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=B:USR1@180" in header
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = shlex.split(_dry_run(tmp_path / "a", "gpu1,gpu2").stdout.splitlines()[2])
    assert not any(w.startswith("checkpoint.resume") for w in first)  # a new job starts fresh
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step_00000040.pt").touch()
    out = _dry_run(tmp_path / "b", "gpu1,gpu2", SLURM_RESTART_COUNT="1")
    trainers = shlex.split(out.stdout.splitlines()[2])
    assert trainers.index("checkpoint.resume=latest") > trainers.index("trainer.steps=10")  # after the user's
    assert f"continuing from the newest checkpoint in {tmp_path / 'b' / 'run'}" in out.stderr
