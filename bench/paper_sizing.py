"""Sizing a paper-scale run on paper: FLOPs per generated sample and per training image,
producer GPUs per trainer GPU, reuse and buffer memory for CC3M / ViT-B-16 with M = 10 at 256 px.

The run being sized is a composed config (default ``experiment=paper_cc3m``; Hydra overrides
as positional arguments): its generator, resolution, M, steps, guidance, CLIP model, images
per step, trainer steps, ``samples_per_insert`` and ``producer.num_producers`` come from there.

The FLOPs are counted, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` over one
forward of each network with the paper generator's published architecture
(``random:CompVis/ldm-text2im-large-256``, built on the ``meta`` device: shapes only, no
memory, no weights) and of open_clip's ViT-B-16. A training step costs 3x its forward
(forward + backward). The paper's setting per generated sample: one text embedding, one VAE
encode and ``inversion_steps`` unguided UNet rows per source image, shared by its M samples;
``steps`` guided steps of 2 UNet rows each and one VAE decode per sample.

Turning FLOPs into GPU time needs a throughput per GPU. ``--gen-samples-per-s`` and
``--train-samples-per-s`` take measured ones (``bench/gpu_check.sh`` on a GPU: the sampler's
bf16 row, the trainer's mix row); without them the projection uses ``--peak-tflops`` (the
GPU's dense bf16 peak from its datasheet, default the H100/H200 SXM's 989) times ``--mfu``
(the fraction of peak a workload reaches; named assumption, default 0.35 for both).

Then, per trainer GPU with the config's real + synthetic images per step:
generated samples drawn per second = trainer steps/s x synthetic batch; the producer side
must insert ``drawn / samples_per_insert`` of them, so producer GPUs per trainer GPU =
``drawn / (samples_per_insert x producer samples/s)``. Buffer memory per trainer rank =
capacity x resolution² x 3 bytes (received images are kept decoded).

Online against generate-then-train, projected to dedicated GPUs (``producer.num_producers`` beside
``--trainer-gpus``) for the same run: the generation takes ``G`` = distinct samples / (producer
GPUs x producer samples/s) and the training ``T`` = steps x images per step / trainer samples/s.
Online overlaps them: ``max(G, T)``. Offline runs them in sequence, either on the same dedicated
GPUs (``G + T``) or pooling every GPU into each phase (``(G x producer GPUs + T x trainer GPUs) /
all GPUs``). Named assumptions: both phases scale linearly with GPUs; startup, evaluation, the
buffer's warm-up and the offline pipeline's storage (writing and reading the samples) cost
nothing; the producers keep up (else online waits on them, which ``max`` already counts).

    python bench/paper_sizing.py [--gen-samples-per-s X --train-samples-per-s Y] [--json OUT] [OVERRIDES]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100/H200 SXM datasheet, dense (no sparsity) BF16 Tensor Core


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def generator_flops(generator: str, resolution: int) -> dict[str, float]:
    """FLOPs of one call of each generator network, batch 1 (UNet: one latent row)."""
    from edsam_online.diffusion.architectures import random_components

    comps, _ = random_components(generator, device="meta")
    vae, unet, text = comps["vae"], comps["unet"], comps["text_encoder"]
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    length = min(comps["tokenizer"].model_max_length, text.config.max_position_embeddings)  # as LatentDiffusion
    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    image = torch.zeros(1, 3, resolution, resolution, device="meta")
    z = torch.zeros(1, unet.config.in_channels, latent, latent, device="meta")
    emb = torch.zeros(1, length, unet.config.cross_attention_dim, device="meta")
    t = torch.tensor([500], device="meta")
    with torch.no_grad():
        return {"text_encoder": _flops(lambda: text(ids)),
                "vae_encode": _flops(lambda: vae.encode(image)),
                "unet_row": _flops(lambda: unet(z, t, encoder_hidden_states=emb)),
                "vae_decode": _flops(lambda: vae.decode(z)),
                "latent": latent, "text_length": length}


def per_sample_flops(f: dict[str, float], m: int, inversion_steps: int, steps: int, guidance: bool) -> dict:
    """FLOPs per generated sample of the ED-SAM setting, split by network."""
    unet_rows = inversion_steps / m + steps * (2 if guidance else 1)
    split = {"text_encoder": f["text_encoder"] / m, "vae_encode": f["vae_encode"] / m,
             "unet": f["unet_row"] * unet_rows, "vae_decode": f["vae_decode"]}
    return {"split": split, "total": sum(split.values()), "unet_rows": unet_rows}


def clip_train_flops(model: str, resolution: int) -> float:
    """FLOPs of one training image-caption pair (forward of both towers, x3 for backward)."""
    import open_clip

    net = open_clip.create_model(model, device="meta")
    image = torch.zeros(1, 3, resolution, resolution, device="meta")
    text = torch.zeros(1, net.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        return 3 * _flops(lambda: net(image, text))


def project_online_offline(gen_rate: float, train_rate: float, distinct: float, images: float,
                           producer_gpus: int, trainer_gpus: int) -> dict[str, float]:
    """Wall-clock seconds of one run, online and offline (see the module docstring)."""
    generate = distinct / (producer_gpus * gen_rate)
    train = images / (trainer_gpus * train_rate)
    pooled = (generate * producer_gpus + train * trainer_gpus) / (producer_gpus + trainer_gpus)
    return {"generate_s": generate, "train_s": train, "online_s": max(generate, train),
            "offline_dedicated_s": generate + train, "offline_pooled_s": pooled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer-gpus", type=int, default=8, help="trainer ranks (launch.sh --trainers)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of peak, both sides")
    parser.add_argument("--gen-samples-per-s", type=float, help="measured producer GPU samples/s (overrides FLOPs)")
    parser.add_argument("--train-samples-per-s", type=float, help="measured trainer GPU images/s (overrides FLOPs)")
    parser.add_argument("--spi", type=float, nargs="*", default=[1.0, 2.0, 4.0, 8.0],
                        help="samples_per_insert rows besides the config's own")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", default=["experiment=paper_cc3m"],
                        help="Hydra overrides of the run being sized (its generator, M, steps, batch, reuse)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from edsam_online.config import load_config

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = load_config(compose("config", overrides=list(args.overrides)))
    d = cfg.diffusion
    real = cfg.trainer.batch_size
    syn = cfg.mix.extra_batch_size(real)
    generator = d.model.removeprefix("random:")
    gen = generator_flops(generator, d.resolution)
    sample = per_sample_flops(gen, d.m, d.inversion_steps, d.steps, guidance=d.guidance != 1.0)
    train = clip_train_flops(cfg.model.name, cfg.model.image_size or cfg.eval.resolution)
    effective = args.peak_tflops * 1e12 * args.mfu
    gen_rate = args.gen_samples_per_s or effective / sample["total"]
    train_rate = args.train_samples_per_s or effective / train
    source = ("measured" if args.gen_samples_per_s else f"{args.mfu:.2f} x {args.peak_tflops:g} TFLOP/s",
              "measured" if args.train_samples_per_s else f"{args.mfu:.2f} x {args.peak_tflops:g} TFLOP/s")
    images_per_step = real + syn
    steps_per_s = train_rate / images_per_step
    drawn_per_s = steps_per_s * syn
    total_drawn = cfg.trainer.steps * syn * args.trainer_gpus
    config_spi = cfg.buffer.samples_per_insert
    spis = sorted(set(args.spi) | {config_spi, drawn_per_s / gen_rate})
    producer_gpus = cfg.producer.num_producers
    print(f"{' '.join(args.overrides)}: generator {generator}: per call (batch 1) text encoder {gen['text_encoder'] / 1e9:.1f} GFLOP, "
          f"VAE encode {gen['vae_encode'] / 1e9:.1f}, UNet row ({gen['latent']}x{gen['latent']} latent) "
          f"{gen['unet_row'] / 1e9:.1f}, VAE decode {gen['vae_decode'] / 1e9:.1f}")
    print(f"\nper generated sample (M = {d.m}, {d.inversion_steps} inversion steps, {d.steps} guided steps: "
          f"{sample['unet_rows']:.1f} UNet rows): {sample['total'] / 1e12:.2f} TFLOP")
    print("| network | TFLOP per sample | share |\n|---|---:|---:|")
    for name, value in sample["split"].items():
        print(f"| {name} | {value / 1e12:.3f} | {value / sample['total']:.1%} |")
    print(f"\n{cfg.model.name} training: {train / 1e9:.1f} GFLOP per image (forward + backward)")
    print(f"\nproducer GPU: {gen_rate:.1f} samples/s ({source[0]}); trainer GPU: {train_rate:.0f} images/s ({source[1]})"
          f" = {steps_per_s:.2f} steps/s of {real} real + {syn} generated, drawing {drawn_per_s:.0f} "
          f"generated samples/s")
    rows = []
    print(f"\n| samples_per_insert | producer GPUs per trainer GPU | distinct generated samples in {cfg.trainer.steps} "
          f"steps x {args.trainer_gpus} GPUs |\n|---:|---:|---:|")
    for spi in spis:
        ratio = drawn_per_s / (spi * gen_rate)
        rows.append({"samples_per_insert": spi, "producers_per_trainer": ratio, "distinct": total_drawn / spi})
        print(f"| {spi:.3g} | {ratio:.2f} | {total_drawn / spi / 1e6:.1f} M |")
    print(f"\nonline against generate-then-train, {producer_gpus} producer + {args.trainer_gpus} trainer GPUs, "
          f"{cfg.trainer.steps} steps (hours; ratio = online / offline)")
    print("| samples_per_insert | generate G | train T | online max(G, T) | offline G + T (dedicated) | ratio "
          "| offline, all GPUs per phase | ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        p = project_online_offline(gen_rate, train_rate, row["distinct"],
                                   cfg.trainer.steps * images_per_step * args.trainer_gpus, producer_gpus,
                                   args.trainer_gpus)
        row["projection"] = p
        h = {k: v / 3600 for k, v in p.items()}
        print(f"| {row['samples_per_insert']:.3g} | {h['generate_s']:.2f} | {h['train_s']:.2f} | {h['online_s']:.2f} "
              f"| {h['offline_dedicated_s']:.2f} | {p['online_s'] / p['offline_dedicated_s']:.2f} "
              f"| {h['offline_pooled_s']:.2f} | {p['online_s'] / p['offline_pooled_s']:.2f} |")
    item = d.resolution * d.resolution * 3  # a received sample is kept decoded, at the generator's size
    print("\n| buffer capacity per rank | host memory per rank | minutes of inserts it holds at 1 producer/trainer |"
          "\n|---:|---:|---:|")
    for capacity in (8192, 16384, 32768, 65536):
        print(f"| {capacity} | {capacity * item / 2**30:.1f} GiB | {capacity / gen_rate / 60:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"generator_flops": gen, "per_sample": sample, "train_flops": train,
                                               "gen_rate": gen_rate, "train_rate": train_rate, "rows": rows,
                                               "sources": source, "config_spi": config_spi,
                                               "overrides": args.overrides}, indent=1))


if __name__ == "__main__":
    main()
