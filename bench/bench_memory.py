"""Trainer memory once the replay buffer is full: RSS growth over a long window, and buffer bytes.

Runs ``scripts/launch.sh`` (one producer, one trainer; ``experiment=cpu_demo`` unless
overridden, with enough steps to outlast the window), waits until the trainer's buffer is full
(``buffer/fill`` = 1 in its JSONL), then reads the trainer rank's resident set size
(``/proc/<pid>/status`` VmRSS of the ``consumers.train`` worker) every ``--interval`` seconds
for ``--minutes``, and stops the run. Reports:

- RSS when the buffer became full, at the end, its maximum, and the growth in % over the
  window (end against start, and a least-squares slope in MiB per minute);
- ``buffer/bytes`` (the images the buffer keeps alive) against ``capacity x item bytes``
  (item bytes = H x W x 3 of one received image).

    python bench/bench_memory.py --minutes 10 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edsam_online.metrics import read_jsonl  # noqa: E402


def _trainer_pid() -> int | None:
    """The torchrun worker running ``consumers.train`` (not torchrun itself)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"consumers.train" in cmd and not any(b"torchrun" in c or b"torch.distributed.run" in c for c in cmd):
            return int(entry.name)
    return None


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="the window after the buffer is full")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS readings")
    parser.add_argument("--run-dir", help="the run folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the readings and the summary here")
    parser.add_argument("overrides", nargs="*", default=["experiment=cpu_demo", "trainer.steps=1000000",
                                                          "logging.wandb=false", "trainer.progress=false"],
                        help="Hydra overrides for the run")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-memory-"))
    log = open(run_dir.parent / f"{run_dir.name}.log", "wb")
    proc = subprocess.Popen(["bash", "scripts/launch.sh", "--run-dir", str(run_dir), *args.overrides], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    jsonl = run_dir / "metrics" / "trainer0.jsonl"
    readings: list[tuple[float, float]] = []
    try:
        full = None
        while full is None:
            if proc.poll() is not None:
                raise RuntimeError(f"launch.sh ended (status {proc.returncode}) before the buffer was full; see {log.name}")
            records = read_jsonl(jsonl) if jsonl.exists() else []
            full = next((r for r in records if r.get("buffer/fill", 0) >= 1.0), None)
            time.sleep(1)
        pid = _trainer_pid()
        if pid is None:
            raise RuntimeError("no consumers.train worker process found")
        print(f"buffer full at step {full['step']}; reading RSS of pid {pid} for {args.minutes} min", flush=True)
        start = time.monotonic()
        while time.monotonic() - start <= args.minutes * 60:
            if proc.poll() is not None:
                raise RuntimeError(f"launch.sh ended (status {proc.returncode}) during the window; see {log.name}")
            readings.append((time.monotonic() - start, _rss_mib(pid)))
            time.sleep(args.interval)
        last = [r for r in read_jsonl(jsonl) if "buffer/bytes" in r][-1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    t = [r[0] / 60 for r in readings]
    rss = [r[1] for r in readings]
    slope = statistics.linear_regression(t, rss).slope
    first_minute = [v for m, v in zip(t, rss) if m <= 1.0]
    last_minute = [v for m, v in zip(t, rss) if m >= t[-1] - 1.0]
    growth = statistics.median(last_minute) / statistics.median(first_minute) - 1
    cfg_capacity = last["buffer/capacity"]
    records = read_jsonl(jsonl)
    steps = [r["step"] for r in records if "train/loss" in r]
    from omegaconf import OmegaConf

    resolution = OmegaConf.load(run_dir / "hydra" / "config.yaml").diffusion.resolution
    item_bytes = resolution * resolution * 3
    summary = {
        "rss_start_mib": statistics.median(first_minute), "rss_end_mib": statistics.median(last_minute),
        "rss_max_mib": max(rss), "growth": growth, "slope_mib_per_min": slope, "minutes": t[-1],
        "steps_in_window": steps[-1] - full["step"] if steps else 0, "buffer_bytes": last["buffer/bytes"],
        "buffer_size": last["buffer/size"], "capacity": cfg_capacity, "item_bytes": item_bytes,
        "buffer_bytes_vs_capacity_items": last["buffer/bytes"] / (cfg_capacity * item_bytes),
    }
    print(json.dumps(summary, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "readings": readings, "overrides": args.overrides},
                                              indent=1))


if __name__ == "__main__":
    main()
