#!/usr/bin/env python
"""The pipelined producer against the sequential loop: 256 px, JPEG, on this machine's CPU.

Both run :class:`edsam_online.producer.Producer` as a producer rank does, in the same
process and the same run, in interleaved rounds (the order alternates; each cell is the
median of ``--rounds``): ``producer.pipeline=true`` (real data decoded ahead in a
torchdata.nodes graph, generated batches JPEG-encoded and sent by a background thread)
and ``producer.pipeline=false`` (read, generate, encode, send one after another in one
thread). Each run sends ``--batches`` batches of ``producer.batch_size=4`` real images x
``M=4`` samples, 256x256, ``stream.encoding=jpeg`` (quality 90), built-in real data
rendered at 256 px, to a PULL socket in a separate process that receives as fast as it
can (it binds, the producer connects: ``stream.producers_bind=false``). The producer's
torch runs on one thread (``producer.threads=1``) so that, on a 2-core box, the second
core serves the decoding and sending threads. Reported per mode: samples/s and
``producer/generator_busy_frac`` (time inside ``sampler.generate`` over the run's wall
time), and pipelined / sequential (the ratio of the medians, and the median of each
round's ratio).

Generators (``--generators``; both by default):

* ``ldm``: a real latent diffusion model at 256 px, the shipped retrained LDM's UNet,
  text encoder, tokenizer and DDIM scheduler with a random-weight ``AutoencoderKL`` that
  downsamples 8x (256 px -> 32x32x4 latents, Stable Diffusion's geometry), loaded from a
  temporary folder as ``diffusion.model=<folder>``, with the sampler's default settings
  (5 inversion and 5 sampling steps, guidance 3). Its images are noise (the VAE is
  untrained), its cost is that of such a model. The shipped model itself at 256 px runs its
  UNet on 128x128 latents (its VAE downsamples 2x): about 11 s per sample here, as is
  ``tiny-random`` (5 s per sample), too slow for repeated rounds.
* ``standin``: what a GPU generator looks like to the host: ``generate`` waits
  ``--standin-ms`` per batch without using a CPU core or holding the GIL (``time.sleep``,
  as a thread waiting on a CUDA stream does) and returns 16 distinct 256 px images
  (prepared beforehand). On CPU the real generator takes so long that host work is a small
  share of it; this shows the producer where generation is as fast as on a GPU.

    python bench/bench_producer.py                              # both generators, 5 rounds
    python bench/bench_producer.py --generators standin --rounds 7
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

SPAWN = mp.get_context("spawn")
SIZE, BATCH, M = 256, 4, 4


def drain(endpoint_q, stop) -> None:
    """A trainer's socket as fast as it can be: bind a PULL socket, receive and discard."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:*")
    endpoint_q.put(sock.last_endpoint.decode())
    while not stop.is_set():
        if sock.poll(100):
            sock.recv_multipart(copy=False)
    sock.close(linger=0)
    ctx.term()


def ldm_folder(root: str) -> str:
    """The shipped retrained LDM with a random 8x-downsampling AutoencoderKL (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL

    from edsam_online.diffusion.registry import SHIPPED_DIR, retrained_model_id

    folder = os.path.join(root, "ldm-256-vae8x")
    shutil.copytree(SHIPPED_DIR / retrained_model_id(32), folder)
    shutil.rmtree(os.path.join(folder, "vae"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False).save_pretrained(
        os.path.join(folder, "vae"))
    return folder


class StandIn:
    """A generator that waits ``ms`` per batch off the CPU and returns distinct 256 px samples."""

    def __init__(self, ms: float) -> None:
        from edsam_online.data import render_sample

        self.wait_s = ms / 1000
        rng = np.random.default_rng(0)
        base = [render_sample(i, "flat", SIZE, 0).image for i in range(BATCH * M)]
        self.images = np.stack([np.clip(b + rng.normal(0, 8, b.shape), 0, 255).astype(np.uint8) for b in base])

    def generate(self, images, captions, keys, m=None, seed=0):
        from edsam_online.diffusion import GeneratedBatch

        time.sleep(self.wait_s)
        b, m = len(images), m or M
        rows = np.arange(b * m)
        return GeneratedBatch(images=self.images[rows % len(self.images)], source_keys=list(keys),
                              captions=list(captions), source=rows // m, alpha=np.full(b * m, 0.1),
                              seed=seed + rows // m, sample_index=rows % m, rho=0.5, model_id="standin",
                              mode="transport", steps=5, inversion_steps=5, guidance=3.0)


def run_once(sampler, endpoint: str, pipeline: bool, batches: int) -> dict[str, float]:
    from edsam_online.data import RealDataConfig
    from edsam_online.producer import Producer, ProducerConfig
    from edsam_online.streaming import StreamConfig

    stream = StreamConfig(endpoints=[endpoint], producers_bind=False, encoding="jpeg")
    pcfg = ProducerConfig(num_samples=batches * BATCH * M, batch_size=BATCH, m=M, threads=1, pipeline=pipeline,
                          send_timeout_s=30)
    data = RealDataConfig(length=100_000)
    return Producer(stream, pcfg, data, sampler, resolution=SIZE, install_signal_handlers=False).run()


def measure(name: str, sampler, endpoint: str, rounds: int, batches: int) -> list:
    runs: dict[bool, list] = {True: [], False: []}
    for pipeline in (True, False):  # warm-up, untimed: first calls, lazy imports
        run_once(sampler, endpoint, pipeline, 1)
    for r in range(rounds):
        for pipeline in ((False, True) if r % 2 == 0 else (True, False)):
            result = run_once(sampler, endpoint, pipeline, batches)
            runs[pipeline].append(result)
            print(f"{name} round {r} {'pipelined ' if pipeline else 'sequential'}: "
                  f"{result['producer/samples_per_s']:.2f} samples/s, "
                  f"busy {result['producer/generator_busy_frac']:.3f}, "
                  f"generate {result['producer/generate_s']:.2f} s, "
                  f"send blocked {result['producer/send_blocked_s']:.3f} s", flush=True)
    rows = []
    for pipeline in (True, False):
        rs = runs[pipeline]
        rows.append((pipeline, statistics.median(x["producer/samples_per_s"] for x in rs),
                     statistics.median(x["producer/generator_busy_frac"] for x in rs),
                     statistics.median(x["producer/generate_s"] / x["producer/sent"] * 1000 for x in rs)))
    paired = statistics.median(p["producer/samples_per_s"] / s["producer/samples_per_s"]
                               for p, s in zip(runs[True], runs[False]))
    return rows, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=["ldm", "standin"], choices=["ldm", "standin"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=0,
                        help="batches per run (default: 5 for ldm, 40 for standin)")
    parser.add_argument("--standin-ms", type=float, default=160.0,
                        help="standin: generation time per batch of 16 samples (160 ms: 100 samples/s)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"{len(os.sched_getaffinity(0))} CPU cores; torch threads 1", flush=True)
    q, stop = SPAWN.Queue(), SPAWN.Event()
    receiver = SPAWN.Process(target=drain, args=(q, stop), daemon=True)
    receiver.start()
    endpoint = q.get(timeout=60)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.generators:
            if name == "ldm":
                from edsam_online.diffusion import SamplerConfig, build_sampler

                sampler = build_sampler(SamplerConfig(model=ldm_folder(tmp), resolution=SIZE))
                label = "ldm (shipped UNet, 8x VAE, 5+5 steps, guidance 3)"
            else:
                sampler = StandIn(args.standin_ms)
                label = f"standin ({args.standin_ms:g} ms per batch off the CPU)"
            batches = args.batches or (5 if name == "ldm" else 40)
            rows, paired = measure(name, sampler, endpoint, args.rounds, batches)
            table.append((name, label, batches, rows, paired))
    stop.set()
    receiver.join(10)
    print(f"\n| generator | samples/run | mode | samples/s | generator_busy_frac | generate ms/sample |")
    print("|---|---|---|---|---|---|")
    for _, label, batches, rows, paired in table:
        for pipeline, sps, busy, ms in rows:
            print(f"| {label} | {batches * BATCH * M} | {'pipelined' if pipeline else 'sequential'} "
                  f"| {sps:.2f} | {busy:.3f} | {ms:.1f} |")
        print(f"| {label} | | **pipelined / sequential** (median of the rounds' ratios) "
              f"| **{rows[0][1] / rows[1][1]:.3f}** ({paired:.3f}) | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"label": label, "samples_per_run": batches * BATCH * M, "paired_ratio": paired,
                              **{("pipelined" if pipeline else "sequential"): {
                                  "samples_per_s": sps, "generator_busy_frac": busy, "generate_ms_per_sample": ms}
                                 for pipeline, sps, busy, ms in rows}}
                       for name, label, batches, rows, paired in table}, f, indent=1)


if __name__ == "__main__":
    main()
