"""Trainer throughput: the online real + synthetic mix against real-only, in one run.

A feeder *process* streams ready-made synthetic samples over ZeroMQ (the real
wire format, through the trainer's own Receiver and ReplayBuffer), as fast as
the socket takes them, so the measurement isolates what the online path costs
the trainer (receiver thread, buffer, decoding, collation), not how fast a
generator is (see the streaming benchmark for that). Same model, data and
optimizer for every mode; modes alternate in rounds so machine-load drift hits
all of them alike, and the median over rounds is reported.

Modes, both with the same number of images per step (``--batch``):
  real   ``batch`` real images
  mix    ``batch/2`` real + ``batch/2`` synthetic from the buffer: Eq. 11 as
         trained with ``trainer.batch_size=batch/2 mix.extra_share=1.0``
         (and the compute-matched ``mix_mode=replace`` at ``batch``, which
         builds the very same step)

``--optimizers fused,for-loop`` runs every mode once per AdamW kernel
(``optim.implementation``), each against the first one's real-only mode.

    python bench/bench_trainer.py --batch 64 --steps 20 --rounds 3
    python bench/bench_trainer.py --model edsam-tiny-rn --batch 96 --optimizers fused,foreach,for-loop
    python bench/bench_trainer.py --model ViT-B-16 --resolution 224 --batch 128 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch


def _feeder(endpoint: str, resolution: int, rate: float, stop) -> None:
    """Push pre-rendered samples in the wire format at ``rate`` per second until told to stop."""
    import zmq

    from edsam_online.data import render_sample
    from edsam_online.diffusion import GeneratedBatch
    from edsam_online.wire import encode_message

    samples = [render_sample(i, "flat", resolution, seed=7) for i in range(256)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    seq = 0
    start = time.monotonic()
    while not stop.is_set():
        ahead = seq / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        s = samples[seq % len(samples)]
        sample = GeneratedBatch.single(s.image, s.key, s.caption, alpha=0.1, seed=seq, model_id="bench-replay")
        try:
            sock.send_multipart(encode_message(sample, "bench", 1, seq), copy=False, flags=zmq.NOBLOCK)
            seq += 1
        except zmq.Again:
            time.sleep(0.001)
    sock.close()
    ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images per step in every mode")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="edsam-tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="ParallelMapper threads per branch")
    parser.add_argument("--feed-rate", type=float, default=500.0,
                        help="synthetic samples/s the feeder process sends (a producer fleet's output)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--optimizers", default="fused",
                        help="comma-separated optim.implementation values; every mode runs with each")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch.distributed as dist

    from edsam_online.config import load_config
    from edsam_online.runtime import free_port
    from edsam_online.trainer import Trainer

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop = mp.Event()
    feeder = mp.Process(target=_feeder, args=(endpoint, args.resolution, args.feed_rate, stop), daemon=True)
    feeder.start()
    run_dir = tempfile.mkdtemp(prefix="bench-trainer-")
    half = args.batch // 2

    def trainer(batch_size: int, extra_share: float, implementation: str) -> Trainer:
        """A Trainer as the trainer rank builds it, with this benchmark's model, data and stream."""
        return Trainer(load_config({
            "model": {"name": args.model},
            "data": {"kind": "builtin", "resolution": args.resolution, "length": 10_000},
            "stream": {"endpoints": [endpoint]},
            "buffer": {"capacity": 1024, "min_size_to_sample": 64, "samples_per_insert": 0.0},
            "trainer": {"batch_size": batch_size, "steps": 10_000, "progress": False},
            "mix": {"extra_share": extra_share, "extra_wait_s": 0.05},
            "optim": {"implementation": implementation},
            "runtime": {"device": args.device, "precision": args.precision, "channels_last": args.channels_last,
                        "num_workers": args.workers},
            "logging": {"wandb": False, "jsonl": False},
            "run_dir": run_dir,
        }))

    optimizers = args.optimizers.split(",")
    modes = {}
    for impl in optimizers:
        suffix = f" {impl}" if len(optimizers) > 1 else ""
        modes["real" + suffix] = trainer(args.batch, 0.0, impl)
        modes["mix" + suffix] = trainer(args.batch - half, half / (args.batch - half), impl)
    buffer = next(t.buffer for t in modes.values() if t.buffer is not None)
    deadline = time.monotonic() + 60
    while len(buffer) < 64 and time.monotonic() < deadline:
        time.sleep(0.1)
    iters = {name: iter(t.loader) for name, t in modes.items()}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modes}

    def run(name: str, steps: int):
        it, step = iters[name], modes[name].train_step
        wait = syn = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            syn += batch.num_genuine / max(1, batch.extra_images.shape[0]) if batch.extra_images.shape[0] else 0.0
            step(batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return steps * args.batch / elapsed, wait / elapsed, syn / steps

    for name in modes:
        run(name, args.warmup)
    for r in range(args.rounds):
        for name in modes:
            results[name].append(run(name, args.steps))
            print(f"round {r} {name:16s} {results[name][-1][0]:7.1f} samples/s  "
                  f"data_wait_frac {results[name][-1][1]:.3f}  synthetic fill {results[name][-1][2]:.2f}", flush=True)

    stop.set()
    stats = next(t.receiver for t in modes.values() if t.receiver is not None).stats()
    for t in modes.values():
        t.close()
    feeder.join(5)
    base = statistics.median(r[0] for r in next(iter(results.values())))
    print(f"\nmodel {args.model}, {args.resolution}px, {args.batch} images/step, {args.steps} steps x "
          f"{args.rounds} rounds, feed {args.feed_rate:g}/s, {args.device} {args.precision}, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print("| mode | samples/s (median) | vs first real-only | train/data_wait_frac | synthetic fill of slot |")
    print("|---|---:|---:|---:|---:|")
    table = []
    for name, rows in results.items():
        sps = statistics.median(r[0] for r in rows)
        table.append({"mode": name, "samples_per_s": sps, "vs_real": sps / base,
                      "data_wait_frac": statistics.median(r[1] for r in rows),
                      "synthetic_fill": statistics.median(r[2] for r in rows)})
        print(f"| {name} | {sps:.1f} | {sps / base:.3f}x | {table[-1]['data_wait_frac']:.3f} | "
              f"{table[-1]['synthetic_fill']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "resolution": args.resolution, "batch": args.batch, "device": args.device,
                       "precision": args.precision, "steps": args.steps, "rounds": args.rounds, "modes": table}, f)
    print(f"\nreceiver: accepted {stats['buffer/accepted']}, dropped {stats['buffer/dropped']}, "
          f"buffer starved {stats['buffer/starved']}")
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
