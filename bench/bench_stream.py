#!/usr/bin/env python
"""Producer-to-buffer throughput across processes over tcp loopback, against bare pyzmq.

For each image size (64, 256), encoding (raw, jpeg) and samples per message K
(``--samples-per-message``, default 1, 16 and 64, the ``stream`` default; capped, as a
producer caps it, to what fits in ``stream.limits.max_message_bytes``), in the same run:

* **edsam**: a sender process builds every message as a producer does (the K rows
  of a ``GeneratedBatch``, the sampler's columnar output built once beforehand as
  generation's output, sliced with ``GeneratedBatch.rows`` and passed to
  ``wire.encode_message``, JPEG encoded per sample) and sends it with
  ``sinks.send_bounded`` from a socket made by ``open_producer_socket``; the main
  process runs a ``Receiver`` thread (full validation, JPEG decode) that inserts every
  sample into a ``ReplayBuffer``. Timed until the last sample is in the buffer.
* **bare**: a sender process sends the same bytes (one pre-built header + payload of
  K images) with ``send_multipart(copy=False)`` to a plain PULL socket that receives
  and discards them (``recv_multipart(copy=False)``). The target's baseline.
  Both use the ``stream`` default high-water marks, as edsam does.
* **bare+keep**: the same, but the PULL side keeps the frames of the last
  ``--capacity`` samples in a deque and drops older ones, as any buffer of that
  capacity must. It separates what holding samples costs (fresh memory for every
  message, cache misses) from what edsam's own code costs.

The receiving process applies the ``stream.tune_malloc`` default
(:mod:`edsam_online.allocator`) before any run, so all three receivers run on the same
allocator settings; ``--no-tune-malloc`` runs all three on glibc's defaults.

The edsam buffer has ``--capacity`` slots (the ``buffer`` default, 4096) and each run
sends several times that many samples, so most of it is the steady state of a full
buffer evicting its oldest items. Reported: samples/s and MB/s, edsam / bare and
edsam / bare+keep, and the CPU cores both processes kept busy during bare and edsam
runs (CPU seconds of every thread, sender and receiver, over the run's wall time): near
the machine's core count, the run is bound by CPU rather than by the transport. Each
cell is the median of ``--repeats`` runs.

    python bench/bench_stream.py            # full table
    python bench/bench_stream.py --quick    # a quarter of the messages (5.5 min on 2 shared cores)

Each edsam sender process imports the diffusion stack for ``GeneratedBatch`` (a few
seconds) before it announces its endpoint, outside the timed part.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import resource
import statistics
import time

import numpy as np
import zmq

from edsam_online.streaming import StreamConfig
from edsam_online.wire import WireLimits

SPAWN = mp.get_context("spawn")


def make_images(size: int, count: int = 8) -> list[np.ndarray]:
    """Smooth shapes plus mild noise: JPEG sizes like real renders, not like white noise."""
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 100 + 128
        out.append(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    return out


def batch(size: int, k: int) -> np.ndarray:
    """K images as one contiguous array, as the sampler's decoder returns a batch."""
    images = make_images(size)
    return np.stack([images[i % len(images)] for i in range(k)])


def generated(size: int, k: int):
    """What the sampler returns for K samples, M = 10 per source image (see ``EDSAMSampler.generate``)."""
    from edsam_online.diffusion import GeneratedBatch

    rows, sources = np.arange(k), -(-k // 10)
    return GeneratedBatch(images=batch(size, k), source_keys=[f"flat-0-{j:08d}" for j in range(sources)],
                          captions=["a small red star on a light background"] * sources, source=rows // 10,
                          alpha=0.1 * (rows % 10) - 0.45, seed=rows // 10, sample_index=rows % 10, rho=0.5,
                          model_id="bench", mode="transport", steps=10, inversion_steps=10, guidance=3.0)


def cpu_s() -> float:
    """CPU seconds this process has used, every thread counted (ZeroMQ's I/O thread too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def edsam_sender(endpoint_q, go, size: int, encoding: str, k: int, n: int) -> None:
    from edsam_online.sinks import open_producer_socket, send_bounded
    from edsam_online.wire import encode_message

    output = generated(size, k)  # before the endpoint is announced: the timed run starts soon after
    cfg = StreamConfig(endpoints=["tcp://127.0.0.1:*"], encoding=encoding, samples_per_message=k)
    ctx = zmq.Context()
    sock = open_producer_socket(ctx, cfg, 0)
    endpoint_q.put(sock.last_endpoint.decode())
    go.wait(60)
    start = cpu_s()
    for seq in range(0, n, k):
        ok, _ = send_bounded(sock, encode_message(output.rows(0, k), "bench", 1, seq, encoding=encoding), 30.0)
        assert ok
    sock.close(linger=30_000)
    ctx.term()
    endpoint_q.put(cpu_s() - start)


def bare_sender(endpoint_q, go, frames: list[bytes], n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = StreamConfig().sndhwm
    sock.bind("tcp://127.0.0.1:*")
    endpoint_q.put(sock.last_endpoint.decode())
    go.wait(60)
    start = cpu_s()
    for _ in range(n):  # messages
        sock.send_multipart(frames, copy=False)
    sock.close(linger=30_000)
    ctx.term()
    endpoint_q.put(cpu_s() - start)


def run_edsam(size: int, encoding: str, k: int, n: int, capacity: int, tune: bool) -> tuple[float, float]:
    """(samples per second, CPU cores busy in both processes), ``n`` samples in messages of ``k``."""
    from edsam_online.buffer import BufferConfig, ReplayBuffer
    from edsam_online.streaming import Receiver

    q, go = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=edsam_sender, args=(q, go, size, encoding, k, n))
    proc.start()
    endpoint = q.get(timeout=60)
    buf = ReplayBuffer(BufferConfig(capacity=capacity))
    with Receiver(StreamConfig(endpoints=[endpoint], samples_per_message=k, tune_malloc=tune), buf) as receiver:
        time.sleep(0.3)  # connected
        t0, cpu0 = time.perf_counter(), cpu_s()
        go.set()
        while receiver.accepted < n:
            time.sleep(0.005)
            if not proc.is_alive() and proc.exitcode != 0:
                raise RuntimeError("sender failed")
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
        assert receiver.stats()["buffer/dropped"] == 0
    cpu += q.get(timeout=60)
    proc.join(30)
    return n / elapsed, cpu / elapsed


def run_bare(frames: list[bytes], k: int, n: int, keep: int = 0) -> tuple[float, float]:
    """(samples per second, CPU cores busy in both processes), ``n`` samples in messages of
    ``k`` (the same frames every time), keeping the messages of the last ``keep`` samples (0: none)."""
    q, go = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=bare_sender, args=(q, go, frames, n // k))
    proc.start()
    endpoint = q.get(timeout=60)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = StreamConfig().rcvhwm
    sock.connect(endpoint)
    kept: collections.deque = collections.deque(maxlen=keep // k)  # maxlen 0 discards at once
    time.sleep(0.3)
    t0, cpu0 = time.perf_counter(), cpu_s()
    go.set()
    for _ in range(n // k):
        kept.append(sock.recv_multipart(copy=False))
    elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    sock.close(linger=0)
    ctx.term()
    cpu += q.get(timeout=60)
    proc.join(30)
    return n / elapsed, cpu / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples-per-message", type=int, nargs="+", default=[1, 16, 64],
                        help="K; capped as a producer caps it, to what fits in stream.limits.max_message_bytes")
    parser.add_argument("--capacity", type=int, default=4096, help="edsam buffer slots (and bare+keep's window)")
    parser.add_argument("--encodings", nargs="+", default=["raw", "jpeg"], choices=["raw", "jpeg"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], choices=[64, 256])
    parser.add_argument("--no-tune-malloc", dest="tune", action="store_false", help="keep glibc's malloc defaults")
    args = parser.parse_args()
    if args.tune:
        from edsam_online.allocator import tune_malloc

        assert tune_malloc(), "mallopt failed"
    print(f"malloc tuned: {args.tune}; {len(os.sched_getaffinity(0))} CPU cores", flush=True)
    from edsam_online.sinks import samples_per_message
    from edsam_online.wire import encode_message

    scale = 0.25 if args.quick else 1.0
    counts = {(64, "raw"): 200000, (64, "jpeg"): 4000, (256, "raw"): 24000, (256, "jpeg"): 1000}  # samples
    rows = []
    for (size, encoding), n in counts.items():
        if size not in args.sizes or encoding not in args.encodings:
            continue
        ks = dict.fromkeys(samples_per_message(StreamConfig(samples_per_message=k,
                                                            limits=WireLimits(max_samples_per_message=max(k, 256))),
                                               size * size * 3) for k in args.samples_per_message)
        for k in ks:
            n_k = max(100, int(n * scale)) // k * k
            frames = encode_message(generated(size, k), "bench", 1, 0, encoding=encoding)
            frames = [bytes(f.buffer) if isinstance(f, zmq.Frame) else bytes(f) for f in frames]
            nbytes = sum(len(f) for f in frames)
            edsam, bare, keep = [], [], []
            for _ in range(args.repeats):  # interleaved so all see the same machine load
                bare.append(run_bare(frames, k, n_k))
                keep.append(run_bare(frames, k, n_k, keep=args.capacity))
                edsam.append(run_edsam(size, encoding, k, n_k, args.capacity, args.tune))
            (e, e_cores), (b, b_cores), (kb, _) = (
                [statistics.median(column) for column in zip(*runs)] for runs in (edsam, bare, keep))
            rows.append((size, encoding, k, nbytes / k, n_k, e, b, kb, b_cores, e_cores))
            print(f"{size}x{size} {encoding} K={k}: edsam {e:.0f} samples/s, bare {b:.0f}, bare+keep {kb:.0f}; "
                  f"ratios {e / b:.2f} / {e / kb:.2f}; cores busy bare {b_cores:.2f}, edsam {e_cores:.2f}", flush=True)
    print("\n| image | encoding | samples/msg | bytes/sample | samples | edsam samples/s | edsam MB/s "
          "| bare samples/s | bare MB/s | bare+keep samples/s | edsam / bare | edsam / bare+keep | cores busy, bare / edsam |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, encoding, k, per_sample, n, e, b, kb, b_cores, e_cores in rows:
        print(f"| {size}x{size} | {encoding} | {k} | {per_sample:.0f} | {n} | {e:.0f} | {e * per_sample / 1e6:.1f} "
              f"| {b:.0f} | {b * per_sample / 1e6:.1f} | {kb:.0f} | {e / b:.2f} | {e / kb:.2f} "
              f"| {b_cores:.2f} / {e_cores:.2f} |")


if __name__ == "__main__":
    main()
