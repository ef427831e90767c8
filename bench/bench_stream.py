#!/usr/bin/env python
"""Producer-to-buffer throughput across processes over tcp loopback, against bare pyzmq.

For each image size (64, 256) and encoding (raw, jpeg), in the same run:

* **edsam**: a sender process builds every message with ``wire.encode_message``
  (JPEG encoded per message, as a producer does) and sends it with
  ``streaming.send_bounded`` from a socket made by ``open_producer_socket``; the
  main process runs a ``Receiver`` thread (full validation, JPEG decode) that
  inserts into a ``ReplayBuffer``. Timed until the last message is in the buffer.
* **bare**: a sender process sends the same bytes (one pre-built header + payload)
  with ``send_multipart(copy=False)`` to a plain PULL socket that receives and
  discards them (``recv_multipart(copy=False)``).

Reported: messages/s and MB/s of each, and edsam / bare. Each cell is the median
of ``--repeats`` runs.

    python bench/bench_stream.py            # full table (~1-2 min)
    python bench/bench_stream.py --quick    # fewer messages
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import zmq

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


def fields(seq: int) -> dict:
    return dict(producer_id="bench", session=1, seq=seq, source_key=f"k{seq}", caption="a small red star on a light background",
                alpha=0.1, rho=0.5, seed=seq, model_id="bench", mode="transport", steps=10, sample_index=0, guidance=3.0)


def edsam_sender(endpoint_q, go, size: int, encoding: str, n: int) -> None:
    from edsam_online.streaming import StreamConfig, open_producer_socket, send_bounded
    from edsam_online.wire import encode_message

    images = make_images(size)
    cfg = StreamConfig(endpoints=["tcp://127.0.0.1:*"], encoding=encoding)
    ctx = zmq.Context()
    sock = open_producer_socket(ctx, cfg, 0)
    endpoint_q.put(sock.last_endpoint.decode())
    go.wait(60)
    for seq in range(n):
        ok, _ = send_bounded(sock, encode_message(images[seq % len(images)], fields(seq), encoding), 30.0)
        assert ok
    sock.close(linger=30_000)
    ctx.term()


def bare_sender(endpoint_q, go, frames: list[bytes], n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = 64
    sock.bind("tcp://127.0.0.1:*")
    endpoint_q.put(sock.last_endpoint.decode())
    go.wait(60)
    for _ in range(n):
        sock.send_multipart(frames, copy=False)
    sock.close(linger=30_000)
    ctx.term()


def run_edsam(size: int, encoding: str, n: int) -> float:
    from edsam_online.buffer import BufferConfig, ReplayBuffer
    from edsam_online.streaming import Receiver, StreamConfig

    q, go = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=edsam_sender, args=(q, go, size, encoding, n))
    proc.start()
    endpoint = q.get(timeout=60)
    buf = ReplayBuffer(BufferConfig(capacity=n))
    with Receiver(StreamConfig(endpoints=[endpoint], rcvhwm=64), buf) as receiver:
        time.sleep(0.3)  # connected
        t0 = time.perf_counter()
        go.set()
        while receiver.accepted < n:
            time.sleep(0.005)
            if not proc.is_alive() and proc.exitcode != 0:
                raise RuntimeError("sender failed")
        elapsed = time.perf_counter() - t0
        assert receiver.stats()["buffer/dropped"] == 0
    proc.join(30)
    return n / elapsed


def run_bare(frames: list[bytes], n: int) -> float:
    q, go = SPAWN.Queue(), SPAWN.Event()
    proc = SPAWN.Process(target=bare_sender, args=(q, go, frames, n))
    proc.start()
    endpoint = q.get(timeout=60)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = 64
    sock.connect(endpoint)
    time.sleep(0.3)
    t0 = time.perf_counter()
    go.set()
    for _ in range(n):
        sock.recv_multipart(copy=False)
    elapsed = time.perf_counter() - t0
    sock.close(linger=0)
    ctx.term()
    proc.join(30)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from edsam_online.wire import encode_message

    scale = 0.25 if args.quick else 1.0
    counts = {(64, "raw"): 20000, (64, "jpeg"): 4000, (256, "raw"): 4000, (256, "jpeg"): 1000}
    rows = []
    for (size, encoding), n in counts.items():
        n = max(100, int(n * scale))
        frames = encode_message(make_images(size)[0], fields(0), encoding)
        frames = [bytes(f.buffer) if isinstance(f, zmq.Frame) else bytes(f) for f in frames]
        nbytes = sum(len(f) for f in frames)
        edsam, bare = [], []
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            bare.append(run_bare(frames, n))
            edsam.append(run_edsam(size, encoding, n))
        e, b = statistics.median(edsam), statistics.median(bare)
        rows.append((size, encoding, nbytes, n, e, b))
        print(f"{size}x{size} {encoding}: edsam {e:.0f} msg/s, bare {b:.0f} msg/s, ratio {e / b:.2f}", flush=True)
    print("\n| image | encoding | bytes/msg | messages | edsam msg/s | edsam MB/s | bare pyzmq msg/s | bare MB/s | edsam / bare |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, encoding, nbytes, n, e, b in rows:
        print(f"| {size}x{size} | {encoding} | {nbytes} | {n} | {e:.0f} | {e * nbytes / 1e6:.1f} | {b:.0f} | "
              f"{b * nbytes / 1e6:.1f} | {e / b:.2f} |")


if __name__ == "__main__":
    main()
