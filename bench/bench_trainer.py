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
         trained with ``trainer.batch_size=batch/2 trainer.syn_share=1.0``
         (and the compute-matched ``mix_mode=replace`` at ``batch``, which
         builds the very same step)

    python bench/bench_trainer.py --batch 64 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time

import numpy as np
import torch


def _feeder(endpoint: str, resolution: int, rate: float, stop) -> None:
    """Push pre-rendered samples in the wire format at ``rate`` per second until told to stop."""
    import zmq

    from edsam_online.data import render_sample
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
        header = {"producer_id": "bench", "session": 1, "seq": seq, "source_key": s.key, "caption": s.caption,
                  "alpha": 0.1, "rho": 0.5, "seed": seq, "model_id": "bench-replay"}
        try:
            sock.send_multipart(encode_message(s.image, header), copy=False, flags=zmq.NOBLOCK)
            seq += 1
        except zmq.Again:
            time.sleep(0.001)
    sock.close()
    ctx.term()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    args = parser.parse_args()

    import torch.distributed as dist

    from consumers.train import _forward_loss
    from edsam_online.buffer import BufferConfig, ReplayBuffer
    from edsam_online.config import TrainerConfig
    from edsam_online.data import RealDataConfig
    from edsam_online.loader import MixedLoader
    from edsam_online.losses import EDSAMLoss
    from edsam_online.models import ClipModelConfig, create_clip
    from edsam_online.optim import build_optimizer, clip_gradients
    from edsam_online.streaming import Receiver, StreamConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    stop = mp.Event()
    feeder = mp.Process(target=_feeder, args=(endpoint, args.resolution, args.feed_rate, stop), daemon=True)
    feeder.start()
    buffer = ReplayBuffer(BufferConfig(capacity=1024, min_size_to_sample=64))
    receiver = Receiver(StreamConfig(endpoints=[endpoint]), buffer).start()
    deadline = time.monotonic() + 60
    while len(buffer) < 64 and time.monotonic() < deadline:
        time.sleep(0.1)

    torch.manual_seed(0)
    model, transform, _, tokenizer = create_clip(ClipModelConfig(name=args.model))
    tcfg = TrainerConfig(batch_size=args.batch, steps=10_000)
    optimizer = build_optimizer(model, tcfg)
    loss_fn = EDSAMLoss("clip")
    data = RealDataConfig(kind="builtin", resolution=args.resolution, length=10_000)
    half = args.batch // 2
    modes = {
        "real": MixedLoader(data, transform, tokenizer, args.batch, num_workers=args.workers),
        "mix": MixedLoader(data, transform, tokenizer, args.batch - half, half, buffer, 0.05,
                               num_workers=args.workers),
    }
    iters = {name: iter(loader) for name, loader in modes.items()}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modes}

    def run(name: str, steps: int):
        it = iters[name]
        wait = syn = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            syn += batch.num_synthetic / max(1, batch.syn_images.shape[0]) if batch.syn_images.shape[0] else 0.0
            out, _ = _forward_loss(model, loss_fn, batch, batch.num_synthetic > 0, torch.device("cpu"), "fp32", False)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            clip_gradients(model, 1.0)
            optimizer.step()
        elapsed = time.perf_counter() - start
        return steps * args.batch / elapsed, wait / elapsed, syn / steps

    for name in modes:
        run(name, args.warmup)
    for r in range(args.rounds):
        for name in modes:
            results[name].append(run(name, args.steps))
            print(f"round {r} {name:8s} {results[name][-1][0]:7.1f} samples/s  "
                  f"data_wait_frac {results[name][-1][1]:.3f}  synthetic fill {results[name][-1][2]:.2f}", flush=True)

    stop.set()
    receiver.stop()
    feeder.join(5)
    stats = receiver.stats()
    base = statistics.median(r[0] for r in results["real"])
    print(f"\nmodel {args.model}, {args.resolution}px, {args.batch} images/step, {args.steps} steps x "
          f"{args.rounds} rounds, feed {args.feed_rate:g}/s, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print("| mode | samples/s (median) | vs real-only | train/data_wait_frac | synthetic fill of slot |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        sps = statistics.median(r[0] for r in rows)
        print(f"| {name} | {sps:.1f} | {sps / base:.3f}x | {statistics.median(r[1] for r in rows):.3f} | "
              f"{statistics.median(r[2] for r in rows):.2f} |")
    print(f"\nreceiver: accepted {stats['buffer/accepted']}, dropped {stats['buffer/dropped']}, "
          f"buffer starved {stats['buffer/starved']}")
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
