"""Online ED-SAM against the paper's generate-then-train pipeline, end to end, in wall-clock time.

Both arms train the same model for the same steps on the same images per step (``experiment=
cpu_demo`` unless overridden: 48 real + 48 generated per step) from the same number ``N`` of
distinct generated samples with the same M:

- **online**: ``scripts/launch.sh`` with one producer and one trainer running side by side; the
  producer stops after ``N`` samples (``producer.num_samples``). Each process has one torch
  thread. The buffer's rate limiter is off (``buffer.samples_per_insert=0``), as the offline
  arm has none: with it, credit beyond its error buffer is forgiven while the producer runs
  ahead, so once a producer limited to ``N`` samples stops, the last steps find the slot
  starved and train on real fallback pairs, which is not the offline arm's work. Both arms
  report how many generated samples they drew (``train/extra_samples``) and the online
  producer how many it sent (it must reach ``N`` before the trainer ends).
- **offline**: first ``python -m producers producer.sink=shards producer.num_samples=N`` writes
  the ``N`` samples to webdataset shards (lossless PNG for raw images), then ``scripts/launch.sh
  method.offline_shards=DIR`` trains reading them (no producer). Each phase gets both of the
  machine's cores (``producer.threads`` / ``runtime.threads`` = ``--cores``).

``N`` defaults to what the online run draws at most: ``steps * synthetic batch /
samples_per_insert``. Arms alternate (online, offline; then offline, online; ...) so drift in
the machine's speed hits both, and medians over ``--reps`` are reported with the ratio
online / offline and where each arm spent its time (from the ranks' JSONL metrics):

- ``startup``: from the command's start to the trainer's first step (imports, the generator
  load in ``producers.prepare``, model build, data graph, buffer warm-up);
- ``train``: the sum of the logged step times (each includes its wait for data);
- ``eval+end``: everything after the last logged step (the final evaluation, checkpoint, exit)
  plus the mid-run evaluations;
- ``generate`` (offline): the shard-writing phase's wall time.

    python bench/bench_online_offline.py --reps 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edsam_online.metrics import read_jsonl  # noqa: E402


def _run(cmd: list[str], log: Path, env: dict) -> float:
    """Run ``cmd`` to the end; returns its wall time (raises with the log's tail on failure)."""
    start = time.time()
    with open(log, "wb") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    return time.time() - start


def _trainer_split(run_dir: Path, start: float, end: float) -> dict[str, float]:
    """startup / train / eval+end seconds of one launch, from the trainer's JSONL."""
    records = read_jsonl(run_dir / "metrics" / "trainer0.jsonl")
    train = [r for r in records if "train/step_time_s" in r]
    steps_logged, train_s, prev = 0, 0.0, 0
    for r in train:
        train_s += r["train/step_time_s"] * (r["step"] - prev)
        steps_logged, prev = r["step"], r["step"]
    first = train[0]
    startup = first["time"] - start - first["train/step_time_s"] * first["step"]
    last = train[-1]
    return {"startup_s": startup, "train_s": train_s, "eval_end_s": (end - start) - startup - train_s,
            "steps": steps_logged, "data_wait_frac": statistics.fmean(r["train/data_wait_frac"] for r in train),
            "steps_without_extra": last["train/steps_without_extra"],
            "extra_fallback_samples": last["train/extra_fallback_samples"], "extra_drawn": last["train/extra_samples"]}


def online(args, work: Path, n: int, env: dict) -> dict:
    run_dir = work / "online"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    wall = _run(["bash", "scripts/launch.sh", "--run-dir", str(run_dir), *args.overrides,
                 f"producer.num_samples={n}", "producer.threads=1", "runtime.threads=1",
                 "buffer.samples_per_insert=0"],
                work / "online.log", env)
    out = {"wall_s": wall, **_trainer_split(run_dir, start, start + wall)}
    producer = read_jsonl(run_dir / "metrics" / "producer0.jsonl")
    out["producer_sent"] = producer[-1]["producer/sent"]
    out["producer_samples_per_s"] = producer[-1]["producer/samples_per_s"]
    return out


def offline(args, work: Path, n: int, env: dict) -> dict:
    run_dir, shards = work / "offline", work / "offline_shards"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    start = time.time()
    generate = _run([sys.executable, "-m", "producers", *args.overrides, f"run_dir={run_dir}",
                     "producer.sink=shards", f"producer.shard_dir={shards}", f"producer.num_samples={n}",
                     f"producer.threads={args.cores}"], work / "offline_generate.log", env)
    t_train = time.time()
    train_wall = _run(["bash", "scripts/launch.sh", "--run-dir", str(run_dir), *args.overrides,
                       f"method.offline_shards={shards}", f"runtime.threads={args.cores}"],
                      work / "offline_train.log", env)
    split = _trainer_split(run_dir, t_train, t_train + train_wall)
    written = sum(1 for _ in shards.glob("*.tar"))
    return {"wall_s": time.time() - start, "generate_s": generate, "train_phase_s": train_wall, **split,
            "generate_samples_per_s": n / generate, "shards": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="runs of each arm (over 2 minutes each: median of 3)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="torch threads of each offline phase")
    parser.add_argument("--samples", type=int, default=0,
                        help="distinct generated samples N (0: steps * synthetic batch / samples_per_insert)")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--json", help="also write every run and the medians here")
    parser.add_argument("overrides", nargs="*", default=["experiment=cpu_demo", "logging.wandb=false",
                                                          "trainer.progress=false"],
                        help="Hydra overrides for both arms")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from edsam_online.config import load_config

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = load_config(compose("config", overrides=list(args.overrides)))
    extra_batch = cfg.mix.extra_batch_size(cfg.trainer.batch_size)
    n = args.samples or int(cfg.trainer.steps * extra_batch / max(cfg.buffer.samples_per_insert, 1.0))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-online-offline-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.cores))
    print(f"{cfg.trainer.steps} steps of {cfg.trainer.batch_size} real + {extra_batch} generated images, "
          f"N = {n} distinct generated samples, M = {cfg.diffusion.m}, {args.cores} cores; work folder {work}",
          flush=True)
    runs: dict[str, list[dict]] = {"online": [], "offline": []}
    arms = {"online": online, "offline": offline}
    for rep in range(args.reps):
        order = ["online", "offline"] if rep % 2 == 0 else ["offline", "online"]
        for name in order:
            result = arms[name](args, work, n, env)
            runs[name].append(result)
            print(f"rep {rep} {name}: {json.dumps({k: round(v, 3) for k, v in result.items()})}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    ratio = statistics.median(on["wall_s"] / off["wall_s"] for on, off in zip(runs["online"], runs["offline"]))
    print(f"\n| arm | wall (s) | startup | generate | train steps | eval + end | data wait | steps without extra "
          f"| generated samples drawn |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in arms:
        gen = f"{med(name, 'generate_s'):.0f}" if name == "offline" else "(overlapped)"
        startup = med(name, "startup_s")
        print(f"| {name} | {med(name, 'wall_s'):.0f} | {startup:.0f} | {gen} | {med(name, 'train_s'):.0f} | "
              f"{med(name, 'eval_end_s'):.0f} | {med(name, 'data_wait_frac'):.3f} | "
              f"{med(name, 'steps_without_extra'):.0f} | {med(name, 'extra_drawn'):.0f} |")
    print(f"\nonline / offline wall-clock: {ratio:.3f} (median of {args.reps} paired reps; per rep: "
          + ", ".join(f"{on['wall_s'] / off['wall_s']:.3f}" for on, off in zip(runs["online"], runs["offline"]))
          + ")")
    print(f"producer (online, 1 thread): sent {min(r['producer_sent'] for r in runs['online'])} of N = {n} at "
          f"{med('online', 'producer_samples_per_s'):.1f} samples/s; "
          f"offline generation ({args.cores} threads): {med('offline', 'generate_samples_per_s'):.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "cores": args.cores, "overrides": args.overrides,
                                               "ratio": ratio, "runs": runs}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
