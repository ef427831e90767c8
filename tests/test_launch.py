"""scripts/launch.sh end to end: a producer that dies does not stop the job."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from test_trainer_dist import COMMON, _env, _stop, _train_logs

from edsam_online.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_kill_9_of_the_producer_leaves_the_trainer_running_to_its_last_step(tmp_path):
    run_dir, steps = tmp_path / "run", 150
    out = tmp_path / "launch.out"
    launch = subprocess.Popen(
        ["bash", "scripts/launch.sh", "--base-port", str(free_port()), "--run-dir", str(run_dir), *COMMON,
         f"trainer.steps={steps}", "trainer.batch_size=4", "mix.syn_share=0.5", "mix.syn_wait_s=0.05",
         "buffer.min_size_to_sample=1", "buffer.samples_per_insert=0", "buffer.max_times_sampled=1",
         "producer.batch_size=2", "producer.threads=1",
         "runtime.threads=1"],
        cwd=ROOT, env=_env(), stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launch.poll() is None:
            logs = _train_logs(run_dir, 0)
            if logs and logs[-1]["train/syn_samples"] > 0:
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
    assert f"producer pid {producer_pid} exited (status 137); the trainers go on without it" in text
    after = _train_logs(run_dir, 0)
    assert after[-1]["step"] == steps
    assert after[-1]["train/steps_without_syn"] > before["train/steps_without_syn"]  # trained on the fallback
    assert "zero-shot" in text
