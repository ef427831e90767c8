"""Sizing a paper-scale run on paper: FLOPs per generated sample and per training image,
producer GPUs per trainer GPU, reuse and buffer memory for CC3M / ViT-B-16 with M = 10 at 256 px.

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

Then, per trainer GPU with ``--real`` real + ``--real`` synthetic images per step:
generated samples drawn per second = trainer steps/s x synthetic batch; the producer side
must insert ``drawn / samples_per_insert`` of them, so producer GPUs per trainer GPU =
``drawn / (samples_per_insert x producer samples/s)``. Buffer memory per trainer rank =
capacity x 256 x 256 x 3 bytes (received images are kept decoded).

    python bench/paper_sizing.py [--gen-samples-per-s X --train-samples-per-s Y] [--json OUT]
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

GENERATOR = "CompVis/ldm-text2im-large-256"
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100/H200 SXM datasheet, dense (no sparsity) BF16 Tensor Core


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def generator_flops(resolution: int = 256) -> dict[str, float]:
    """FLOPs of one call of each generator network, batch 1 (UNet: one latent row)."""
    from edsam_online.diffusion.architectures import random_components

    comps, _ = random_components(GENERATOR, device="meta")
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


def clip_train_flops(model: str = "ViT-B-16", resolution: int = 224) -> float:
    """FLOPs of one training image-caption pair (forward of both towers, x3 for backward)."""
    import open_clip

    net = open_clip.create_model(model, device="meta")
    image = torch.zeros(1, 3, resolution, resolution, device="meta")
    text = torch.zeros(1, net.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        return 3 * _flops(lambda: net(image, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inversion-steps", type=int, default=10)
    parser.add_argument("--real", type=int, default=256, help="real images per trainer rank per step (= synthetic)")
    parser.add_argument("--trainer-steps", type=int, default=30000)
    parser.add_argument("--trainer-gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of peak, both sides")
    parser.add_argument("--gen-samples-per-s", type=float, help="measured producer GPU samples/s (overrides FLOPs)")
    parser.add_argument("--train-samples-per-s", type=float, help="measured trainer GPU images/s (overrides FLOPs)")
    parser.add_argument("--spi", type=float, nargs="*", default=[1.0, 2.0, 4.0, 8.0], help="samples_per_insert rows")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    gen = generator_flops()
    sample = per_sample_flops(gen, args.m, args.inversion_steps, args.steps, guidance=True)
    train = clip_train_flops()
    effective = args.peak_tflops * 1e12 * args.mfu
    gen_rate = args.gen_samples_per_s or effective / sample["total"]
    train_rate = args.train_samples_per_s or effective / train
    source = ("measured" if args.gen_samples_per_s else f"{args.mfu:.2f} x {args.peak_tflops:g} TFLOP/s",
              "measured" if args.train_samples_per_s else f"{args.mfu:.2f} x {args.peak_tflops:g} TFLOP/s")
    images_per_step = 2 * args.real
    steps_per_s = train_rate / images_per_step
    drawn_per_s = steps_per_s * args.real
    total_drawn = args.trainer_steps * args.real * args.trainer_gpus
    print(f"generator {GENERATOR}: per call (batch 1) text encoder {gen['text_encoder'] / 1e9:.1f} GFLOP, "
          f"VAE encode {gen['vae_encode'] / 1e9:.1f}, UNet row ({gen['latent']}x{gen['latent']} latent) "
          f"{gen['unet_row'] / 1e9:.1f}, VAE decode {gen['vae_decode'] / 1e9:.1f}")
    print(f"\nper generated sample (M = {args.m}, {args.inversion_steps} inversion steps, {args.steps} guided steps: "
          f"{sample['unet_rows']:.1f} UNet rows): {sample['total'] / 1e12:.2f} TFLOP")
    print("| network | TFLOP per sample | share |\n|---|---:|---:|")
    for name, value in sample["split"].items():
        print(f"| {name} | {value / 1e12:.3f} | {value / sample['total']:.1%} |")
    print(f"\nViT-B-16 training: {train / 1e9:.1f} GFLOP per image (forward + backward)")
    print(f"\nproducer GPU: {gen_rate:.1f} samples/s ({source[0]}); trainer GPU: {train_rate:.0f} images/s ({source[1]})"
          f" = {steps_per_s:.2f} steps/s of {args.real} real + {args.real} generated, drawing {drawn_per_s:.0f} "
          f"generated samples/s")
    rows = []
    print(f"\n| samples_per_insert | producer GPUs per trainer GPU | distinct generated samples in {args.trainer_steps} "
          f"steps x {args.trainer_gpus} GPUs |\n|---:|---:|---:|")
    for spi in args.spi:
        ratio = drawn_per_s / (spi * gen_rate)
        rows.append({"samples_per_insert": spi, "producers_per_trainer": ratio, "distinct": total_drawn / spi})
        print(f"| {spi:g} | {ratio:.2f} | {total_drawn / spi / 1e6:.1f} M |")
    item = 256 * 256 * 3
    print("\n| buffer capacity per rank | host memory per rank | minutes of inserts it holds at 1 producer/trainer |"
          "\n|---:|---:|---:|")
    for capacity in (8192, 16384, 32768, 65536):
        print(f"| {capacity} | {capacity * item / 2**30:.1f} GiB | {capacity / gen_rate / 60:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"generator_flops": gen, "per_sample": sample, "train_flops": train,
                                               "gen_rate": gen_rate, "train_rate": train_rate, "rows": rows,
                                               "sources": source}, indent=1))


if __name__ == "__main__":
    main()
