"""Process targets and fixtures for the streaming tests (importable by spawned children)."""

from __future__ import annotations

import time

import numpy as np

from edsam_online.wire import encode_message


def tiny_configs(m: int = 2, batch_size: int = 2):
    from edsam_online.data import RealDataConfig
    from edsam_online.diffusion import SamplerConfig

    data = RealDataConfig(resolution=32, length=400)
    sampler = SamplerConfig(model="tiny-random", m=m, steps=1, inversion_steps=1, resolution=32, batch_size=8)
    return data, sampler


def producer_main(endpoint: str, rank: int, num_producers: int, num_samples: int, **stream_kw) -> None:
    """A producer rank with the tiny random sampler, binding ``endpoint``."""
    import torch

    torch.set_num_threads(1)
    from edsam_online.diffusion import build_sampler
    from edsam_online.producer import Producer, ProducerConfig
    from edsam_online.streaming import StreamConfig

    data, sampler = tiny_configs()
    stream = StreamConfig(endpoints=[endpoint] * num_producers, **stream_kw)
    pcfg = ProducerConfig(rank=rank, num_producers=num_producers, num_samples=num_samples, batch_size=2,
                          seed=11, send_timeout_s=30.0, stats_every=1)
    Producer(stream, pcfg, data, build_sampler(sampler)).run()


def receiver_main(endpoints: list[str], results, stop) -> None:
    """A receiving process: buffer + Receiver; on ``stop`` reports every accepted sample id once."""
    from edsam_online.buffer import BufferConfig, ReplayBuffer
    from edsam_online.streaming import Receiver, StreamConfig

    buf = ReplayBuffer(BufferConfig(capacity=10_000, max_times_sampled=1, min_size_to_sample=1, samples_per_insert=0))
    receiver = Receiver(StreamConfig(endpoints=endpoints), buf).start()
    try:
        stop.wait(120)
        # Let messages already on the wire arrive: wait until nothing new for 0.5 s.
        last = -1
        while receiver.stats()["buffer/accepted"] != last:
            last = receiver.stats()["buffer/accepted"]
            time.sleep(0.5)
    finally:
        receiver.stop()
    ids = []
    while (s := buf.sample(0)) is not None:  # max_times_sampled=1: each item exactly once
        ids.append((s.header["producer_id"], s.header["session"], s.header["seq"]))
    results.put((ids, receiver.stats(), receiver.producer_stats()))


def valid_frames(seq: int, encoding: str = "raw", producer_id: str = "raw-client", session: int = 1) -> list:
    """A one-sample message numbered ``seq``, as a producer sends it."""
    from edsam_online.diffusion import GeneratedBatch  # here: spawned receivers need no diffusion stack

    img = np.random.default_rng(seq).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    sample = GeneratedBatch.single(img, f"k{seq}", "a small red star on a light background", alpha=0.1, seed=seq,
                                   model_id="test", rho=0.5)
    return encode_message(sample, producer_id, session, seq, encoding=encoding)


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
