"""What closing the loop costs (``producer.policy=adversarial``), as ratios measured in one run.

1. **Trainer step time**: ``Trainer.train_step`` on the same batches with and without
   feedback (each generated row's own loss queued for its producer and sent every
   ``feedback.every_steps`` steps to a stand-in producer's socket), in alternating rounds;
   median step time per mode.
2. **Producer samples/s**: the steering's work per generated batch (draining the feedback
   that arrives in the time of one batch, drawing its alphas, recording what was sent)
   against the time ``generate`` takes for that batch, both timed here.
3. **Bytes at paper scale** (``experiment=paper_cc3m``): the feedback bytes one generated
   sample earns (one report per draw: ``buffer.samples_per_insert`` on average) against its
   bytes in the forward stream (its JPEG at the paper's quality and size), both from the real
   encoders. The image is a 256 px photograph (scikit-image's astronaut) when scikit-image is
   installed, else noise (which JPEG compresses least: a lower bound on the ratio's denominator
   would be a flat render, an upper one this).

    python bench/bench_feedback.py                      # the demo's trainer and generator, CPU
    python bench/bench_feedback.py --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time

import numpy as np
import torch
import zmq


def _stand_in_producer(ctx: zmq.Context, stop: threading.Event) -> tuple[str, threading.Thread]:
    """A PULL socket drained by a thread, as a steered producer's feedback endpoint."""
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def drain():
        while not stop.is_set():
            if sock.poll(50):
                sock.recv()
        sock.close()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


def trainer_ratio(args) -> dict:
    from edsam_online.config import load_config
    from edsam_online.loader import MixedBatch, Origin
    from edsam_online.runtime import free_port
    from edsam_online.trainer import Trainer

    tree = {"stream": {"endpoints": [f"tcp://127.0.0.1:{free_port()}"]},
            "trainer": {"batch_size": args.batch, "steps": 10**6, "progress": False},
            "model": {"name": "edsam-tiny-rn"}, "runtime": {"device": "cpu", "threads": args.threads},
            "logging": {"wandb": False, "jsonl": False}, "eval": {"linear_probe": False}}
    ctx, stop = zmq.Context(), threading.Event()
    endpoint, drainer = _stand_in_producer(ctx, stop)
    with tempfile.TemporaryDirectory() as run_dir, Trainer(load_config({**tree, "run_dir": run_dir})) as trainer:
        texts = trainer.tokenizer([f"a small red shape number {i}" for i in range(2 * args.batch)])
        real, extra = torch.rand(args.batch, 3, 32, 32), torch.rand(args.batch, 3, 32, 32)

        def batch(feedback: bool, step: int) -> MixedBatch:
            b = MixedBatch(real, texts[:args.batch], [f"r{i}" for i in range(args.batch)], extra, texts[args.batch:],
                           [f"s{i}" for i in range(args.batch)], torch.ones(args.batch, dtype=torch.bool),
                           torch.zeros(args.batch))
            if feedback:
                b.extra_origins = [Origin(1, step * args.batch + i, endpoint) for i in range(args.batch)]
            return b

        times = {"plain": [], "feedback": []}
        for _ in range(2):  # warm-up, both modes
            trainer.train_step(batch(True, 0))
            trainer.train_step(batch(False, 0))
        for _ in range(args.rounds):
            for mode in ("plain", "feedback"):
                start = time.perf_counter()
                for s in range(args.steps):
                    trainer.train_step(batch(mode == "feedback", s))
                times[mode].append((time.perf_counter() - start) / args.steps)
        sent = trainer.feedback.metrics()
    stop.set()
    drainer.join()
    ctx.destroy(linger=0)
    plain, fed = statistics.median(times["plain"]), statistics.median(times["feedback"])
    return {"step_s_plain": plain, "step_s_feedback": fed, "ratio": fed / plain, **sent}


def producer_ratio(args) -> dict:
    from edsam_online.data import render_sample
    from edsam_online.diffusion import SamplerConfig, build_sampler
    from edsam_online.feedback import FeedbackConfig, encode_feedback
    from edsam_online.policy import AdversarialConfig, AdversarialPolicy
    from edsam_online.steering import ProducerSteering

    torch.set_num_threads(args.threads)
    sampler = build_sampler(SamplerConfig())  # the demo's generator at its preset
    samples = [render_sample(i, "flat", 32, 0) for i in range(args.producer_batch)]
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    keys = [s.key for s in samples]
    m = sampler.cfg.m
    steering = ProducerSteering(AdversarialPolicy(sampler.cfg.rho, AdversarialConfig(min_feedback=0)),
                                FeedbackConfig(), 1, data_endpoint="tcp://127.0.0.1:0")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(steering.endpoint)
    time.sleep(0.2)
    # the demo's trainer draws ~140 samples/s and the producer makes ~6/s: per generated batch
    # (producer_batch x M samples) that is ~140 / 6 reports per sample, in messages of every_steps
    # steps' rows
    reports = int(args.producer_batch * m * args.reports_per_sample)
    gen_s, steer_s, seq = [], [], 0
    for r in range(args.rounds + 1):
        start = time.perf_counter()
        out = sampler.generate(images, captions, keys, seed=r)
        gen = time.perf_counter() - start
        for i in range(0, reports, args.entries_per_message):
            n = min(args.entries_per_message, reports - i)
            push.send(encode_feedback("trainer-0", 5, r * 10**6 + i, r, 1, np.arange(n) % max(seq, 1),
                                      np.full(n, 2.0), np.full(n, r)))
        time.sleep(0.2)  # let them arrive: the producer finds them queued, as while it generated
        start = time.perf_counter()
        steering.poll()
        steering.alphas(len(out))
        steering.record(seq, out.alpha, np.ones(len(out)))
        steering.count_sent(out.alpha)
        steer = time.perf_counter() - start
        seq += len(out)
        if r:  # the first round warms up
            gen_s.append(gen)
            steer_s.append(steer)
    ctx.destroy(linger=0)
    applied = steering.ledger.applied
    steering.close()
    g, s = statistics.median(gen_s), statistics.median(steer_s)
    return {"generate_s_per_batch": g, "steering_s_per_batch": s, "ratio": (g + s) / g,
            "reports_per_batch": reports, "applied": applied}


def paper_bytes() -> dict:
    from hydra import compose, initialize_config_dir

    from edsam_online.config import load_config
    from edsam_online.diffusion.sampler import GeneratedBatch
    from edsam_online.feedback import encode_feedback
    from edsam_online.wire import encode_message
    from pathlib import Path

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        cfg = load_config(compose("config", overrides=["experiment=paper_cc3m"]))
    side = cfg.diffusion.resolution
    try:
        from skimage import data as photos
        from PIL import Image

        image, source = np.asarray(Image.fromarray(photos.astronaut()).resize((side, side))), "astronaut photo"
    except ImportError:
        image, source = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "noise"
    k = cfg.stream.samples_per_message
    batch = GeneratedBatch(images=np.repeat(image[None], k, 0), source_keys=["cc3m-000000"],
                           captions=["a person in a space suit holding a flag"], source=np.zeros(k, np.int64),
                           alpha=np.zeros(k), seed=np.zeros(k, np.int64), sample_index=np.arange(k),
                           rho=cfg.diffusion.rho, model_id="CompVis/ldm-text2im-large-256", mode="transport",
                           steps=10, inversion_steps=10, guidance=3.0, unet_calls=0)
    header, payload = encode_message(batch, "producer-0", 1, 0, None, cfg.stream.encoding, cfg.stream.quality,
                                     feedback="tcp://node01:40000")
    forward = (len(header) + len(payload.bytes)) / k
    # a trainer rank's message: every_steps steps of its extra rows (batch_size x extra_share each)
    entries = min(cfg.feedback.every_steps * cfg.mix.extra_batch_size(cfg.trainer.batch_size),
                  cfg.feedback.max_entries)
    message = encode_feedback("trainer-0", 2**61, 10**6, 30000, 2**61, np.arange(entries) + 2**40,
                              np.full(entries, 3.0), np.full(entries, 29000))
    per_report = len(message) / entries
    per_sample = per_report * cfg.buffer.samples_per_insert
    return {"image": source, "forward_bytes_per_sample": forward, "feedback_bytes_per_report": per_report,
            "reports_per_sample": cfg.buffer.samples_per_insert, "ratio": per_sample / forward}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=48, help="trainer real (and extra) rows per step: the demo's")
    p.add_argument("--steps", type=int, default=10, help="trainer steps per round and mode")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--producer-batch", type=int, default=4, help="real images per generated batch: the demo's")
    p.add_argument("--reports-per-sample", type=float, default=32.0, help="the demo's buffer.samples_per_insert")
    p.add_argument("--entries-per-message", type=int, default=240, help="every_steps (5) x the demo's 48 rows")
    args = p.parse_args()
    out = {"trainer": trainer_ratio(args), "producer": producer_ratio(args), "paper_bytes": paper_bytes()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
