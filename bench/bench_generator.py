"""Generator speed: the paper's architecture per component, the ED-SAM sampler against
diffusers' own pipeline, and the sampler's throughput with its speed options.

Subcommands (CPU unless ``--device cuda``; each prints a table, ``--json OUT`` writes it):

  components   median time of each network call of a model (default: the paper's
               architecture with random weights at 256 px): text encoder, VAE encode, one
               UNet step without guidance (batch 1, 2), one with guidance (batch 1, 2 = 2, 4
               UNet rows), VAE decode; then the per-sample cost of the paper's setting
               (M, inversion and sampling steps) composed from them, and its split
  vs-pipeline  EDSAMSampler.generate against the same work written around diffusers'
               LDMTextToImagePipeline (a DDIM inversion loop over the pipeline's own unet,
               vqvae, bert and tokenizer with DDIMInverseScheduler, then M pipeline calls
               per image from the transported latents), same model, device and threads,
               interleaved rounds (A B A B ...), medians and their ratio
  sampler      samples/s of EDSAMSampler.generate for a model name, device, dtype and
               options; ``--variants`` times several configurations interleaved in one run
               and prints each one's ratio to the first

    python bench/bench_generator.py components
    python bench/bench_generator.py vs-pipeline --rounds 5
    python bench/bench_generator.py sampler --model retrained --variants base channels_last compile
    python bench/bench_generator.py sampler --model random:CompVis/ldm-text2im-large-256 --resolution 256 \\
        --device cuda --dtype bf16 --channels-last --batch 8 --m 10 --steps 10

Inputs are random pixels with short captions: a network's time does not depend on what the
image shows, and the bench then needs only torch, diffusers and transformers (it runs where
the project's data stack is not installed). Compile time is reported apart from the steady
state: ``first call`` is the first ``generate`` (it compiles every shape it meets), then
``--warmup`` more calls run untimed. On CUDA every timed call ends with
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edsam_online.diffusion import EDSAMSampler, LatentDiffusion, SamplerConfig, transport
from edsam_online.diffusion.registry import load_sampler_ldm

PAPER = "random:CompVis/ldm-text2im-large-256"
_SHAPES = ("star", "heart", "ring", "cross", "square", "circle", "triangle", "hexagon")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def captions(n: int) -> list[str]:
    """``n`` distinct short captions (the built-in dataset's wording)."""
    return [f"a {('small', 'big')[i // 48 % 2]} {_COLOURS[i // 8 % 6]} {_SHAPES[i % 8]} on a plain background "
            f"number {i}" for i in range(n)]


def images(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def times_after_warmup(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(repeats)]


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")


def _machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- components


def components(a) -> dict:
    cfg = SamplerConfig(model=a.model, resolution=a.resolution, device=a.device, dtype=a.dtype,
                        channels_last=a.channels_last, seed=a.seed)
    t0 = time.perf_counter()
    ldm = load_sampler_ldm(cfg)
    build_s = time.perf_counter() - t0
    dev = ldm.device
    f = ldm.vae_scale_factor
    z = torch.randn(2, ldm.vae.config.latent_channels, a.resolution // f, a.resolution // f, device=dev)
    cond = ldm.embed(captions(2))
    ldm.uncond_embedding(1)
    t = torch.tensor(500, device=dev)
    one_image = images(1, a.resolution)
    calls = {
        "text encoder (1 caption)": (1, lambda: ldm.embed(captions(1))),
        "VAE encode (1 image)": (1, lambda: ldm.encode(one_image)),
        "UNet step, no guidance, batch 1": (1, lambda: ldm.predict_noise(z[:1], t, cond[:1])),
        "UNet step, no guidance, batch 2": (2, lambda: ldm.predict_noise(z, t, cond)),
        "UNet step, guidance, batch 1 (2 rows)": (2, lambda: ldm.guided_noise_fn(cond[:1], a.guidance)(z[:1], t)),
        "UNet step, guidance, batch 2 (4 rows)": (4, lambda: ldm.guided_noise_fn(cond, a.guidance)(z, t)),
        "VAE decode (1 latent)": (1, lambda: ldm.decode(z[:1])),
    }
    rows = {}
    with torch.no_grad():
        for name, (unet_rows, fn) in calls.items():
            times = times_after_warmup(fn, dev, a.warmup, a.repeats)
            rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                          "unet_rows": unet_rows, "times_s": times}
            print(f"  {name}: {rows[name]['median_s']:.3f} s", flush=True)
    med = {k: v["median_s"] for k, v in rows.items()}
    m, s_inv, s = a.m, a.inversion_steps, a.steps

    def compose(batch: int) -> dict:
        """Seconds per generated sample: per source image one text embedding, one VAE encode and
        ``s_inv`` unguided UNet steps, shared by its M samples; per sample ``s`` guided steps and
        one decode. ``batch`` picks the measured UNet batch (its time divided by the batch)."""
        unet = med[f"UNet step, no guidance, batch {batch}"] / batch
        guided = med[f"UNet step, guidance, batch {batch} ({2 * batch} rows)"] / batch
        parts = {
            "UNet, inversion": s_inv * unet / m,
            "UNet, sampling": s * guided,
            "VAE encode": med["VAE encode (1 image)"] / m,
            "VAE decode": med["VAE decode (1 latent)"],
            "text encoder": med["text encoder (1 caption)"] / m,
        }
        total = sum(parts.values())
        # the earlier path embedded a source's caption for its inversion chunk and again, as one
        # row of each sampling chunk, for every sample: 1/M + 1 rows per sample
        per_chunk_text = med["text encoder (1 caption)"] * (1 / m + 1)
        return {"parts_s": parts, "total_s": total, "samples_per_s": 1 / total,
                "shares": {k: v / total for k, v in parts.items()},
                "total_if_embedding_every_chunk_s": total - parts["text encoder"] + per_chunk_text}

    composed = {f"batch {b}": compose(b) for b in (1, 2)}
    print(f"\n{ldm.model_id}, {a.resolution} px, {a.device} {a.dtype}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats} after {a.warmup} warm-up (build {build_s:.0f} s)")
    print(f"{'call':<40} {'median s':>9} {'min':>7} {'max':>7}")
    for name, r in rows.items():
        print(f"{name:<40} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f}")
    print(f"\nper sample, M = {m}, {s_inv} inversion steps (no guidance), {s} sampling steps "
          f"(guidance {a.guidance}), composed from the medians:")
    print(f"{'part':<18} " + " ".join(f"{k + ' s':>10} {'share':>6}" for k in composed))
    for part in composed["batch 1"]["parts_s"]:
        print(f"{part:<18} " + " ".join(f"{c['parts_s'][part]:10.3f} {c['shares'][part]:6.1%}" for c in composed.values()))
    print(f"{'total':<18} " + " ".join(f"{c['total_s']:10.3f} {'':>6}" for c in composed.values()))
    print(f"{'samples/s':<18} " + " ".join(f"{c['samples_per_s']:10.4f} {'':>6}" for c in composed.values()))
    for k, c in composed.items():
        print(f"{k}: embedding every caption per chunk (the earlier path) would add "
              f"{c['total_if_embedding_every_chunk_s'] - c['total_s']:.3f} s per sample "
              f"({c['total_if_embedding_every_chunk_s'] / c['total_s']:.3f}x this path's time)")
    return {"subcommand": "components", "model": ldm.model_id, "resolution": a.resolution, "device": a.device,
            "dtype": a.dtype, "repeats": a.repeats, "warmup": a.warmup, "build_s": build_s, "calls": rows,
            "setting": {"m": m, "inversion_steps": s_inv, "steps": s, "guidance": a.guidance},
            "composed": composed, "machine": _machine()}


# ----------------------------------------------------------------------------- vs-pipeline


def pipeline_generate(pipe, imgs: np.ndarray, caps: list[str], m: int, steps: int, guidance: float, rho: float,
                      seed: int) -> np.ndarray:
    """The same work as ``EDSAMSampler.generate``, written as a diffusers user would: per image,
    encode, embed and invert with the pipeline's components and ``DDIMInverseScheduler``, then
    ``m`` calls of ``LDMTextToImagePipeline`` from the transported latents (the same transport
    and seeds as the sampler's). The pipeline embeds the caption and the empty caption on every
    call and runs its scheduler's ``step`` with ``eta=0``: deterministic DDIM."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    out = []
    with torch.no_grad():
        for i, (img, cap) in enumerate(zip(imgs, caps)):
            x = torch.from_numpy(img[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            z = pipe.vqvae.encode(x.to(pipe.device)).latent_dist.mean * pipe.vqvae.config.scaling_factor
            ids = pipe.tokenizer([cap], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids.to(pipe.device)
            emb = pipe.bert(ids)[0]
            inverse.set_timesteps(steps)
            for t in inverse.timesteps:
                z = inverse.step(pipe.unet(z, t, encoder_hidden_states=emb).sample, t, z).prev_sample
            gen = torch.Generator(device=z.device).manual_seed(seed + i)
            z_t, _ = transport(z.expand(m, *z.shape[1:]), rho, "transport", gen)
            for j in range(m):
                x = pipe(cap, latents=z_t[j:j + 1], num_inference_steps=steps, guidance_scale=guidance, eta=0.0,
                         output_type="np").images
                out.append((x * 255).round().astype(np.uint8))
    return np.concatenate(out)


def vs_pipeline(a) -> dict:
    from diffusers import DDIMScheduler, LDMTextToImagePipeline

    cfg = SamplerConfig(model=a.model, resolution=a.resolution, device=a.device, m=a.m, steps=a.steps,
                        inversion_steps=a.steps, guidance=a.guidance, rho=a.rho, batch_size=a.batch_size, seed=a.seed)
    ldm = load_sampler_ldm(cfg)
    if ldm.layout != "compvis":
        raise SystemExit(f"vs-pipeline compares against LDMTextToImagePipeline: needs a CompVis-layout model, "
                         f"got {ldm.model_id} ({ldm.layout})")
    sampler = EDSAMSampler(ldm, cfg)
    pipe = LDMTextToImagePipeline(vqvae=ldm.vae, bert=ldm.text_encoder, tokenizer=ldm.tokenizer, unet=ldm.unet,
                                  scheduler=DDIMScheduler.from_config(ldm.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    imgs, caps = images(a.images, a.resolution), captions(a.images)
    keys = [f"k{i}" for i in range(a.images)]
    runs = {"sampler": lambda: sampler.generate(imgs, caps, keys, seed=a.seed).images,
            "pipeline": lambda: pipeline_generate(pipe, imgs, caps, a.m, a.steps, a.guidance, a.rho, a.seed)}
    times = {k: [] for k in runs}
    outputs = {}
    for r in range(a.warmup + a.rounds):
        for name, fn in runs.items():  # A B A B ...
            t0 = time.perf_counter()
            outputs[name] = fn()
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                times[name].append(dt)
            print(f"  round {r}{' (warm-up)' if r < a.warmup else ''} {name}: {dt:.1f} s", flush=True)
    n = a.images * a.m
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = np.abs(outputs["sampler"].astype(np.int16) - outputs["pipeline"].astype(np.int16))
    result = {
        "subcommand": "vs-pipeline", "model": ldm.model_id, "resolution": a.resolution, "images": a.images,
        "m": a.m, "steps": a.steps, "guidance": a.guidance, "batch_size": a.batch_size, "rounds": a.rounds,
        "times_s": times, "median_s": med, "samples_per_s": {k: n / v for k, v in med.items()},
        "ratio_sampler_over_pipeline": med["pipeline"] / med["sampler"],
        "output": {k: [list(v.shape), str(v.dtype)] for k, v in outputs.items()},
        "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()), "machine": _machine(),
    }
    print(f"\n{ldm.model_id}, {a.resolution} px, {a.images} images x M = {a.m}, {a.steps} steps, guidance "
          f"{a.guidance}, {torch.get_num_threads()} threads, median of {a.rounds} interleaved rounds")
    print(f"{'':<10} {'median s':>9} {'samples/s':>10}  output")
    for k in runs:
        print(f"{k:<10} {med[k]:9.2f} {n / med[k]:10.4f}  {result['output'][k]}")
    print(f"sampler / pipeline samples/s: {result['ratio_sampler_over_pipeline']:.3f}x; outputs differ by at most "
          f"{result['max_abs_diff']} (mean {result['mean_abs_diff']:.3f}) of 255")
    return result


# ----------------------------------------------------------------------------- sampler

VARIANTS = "base, channels_last, compile, attn-classic, deepcache-N (N = interval), fp32/bf16/fp16"


def variant_config(base: SamplerConfig, name: str) -> tuple[SamplerConfig, str | None]:
    """(SamplerConfig, attention processor or None) of a variant: ``base`` with one change."""
    if name == "base":
        return base, None
    if name == "channels_last":
        return replace(base, channels_last=True), None
    if name == "compile":
        return replace(base, compile=True), None
    if name == "attn-classic":
        return base, "classic"
    if name in ("fp32", "bf16", "fp16"):
        return replace(base, dtype=name), None
    if name.startswith("deepcache-") and name[len("deepcache-"):].isdigit():
        return replace(base, deepcache_interval=int(name[len("deepcache-"):])), None
    raise SystemExit(f"unknown variant {name!r}; variants: {VARIANTS}")


def build(cfg: SamplerConfig, attn: str | None) -> EDSAMSampler:
    ldm: LatentDiffusion = load_sampler_ldm(cfg)
    if attn == "classic":  # diffusers' explicit softmax(QK^T)V, instead of its default SDPA processor
        from diffusers.models.attention_processor import AttnProcessor

        ldm.unet.set_attn_processor(AttnProcessor())
    return EDSAMSampler(ldm, cfg)


def sampler_bench(a) -> dict:
    d = SamplerConfig()
    # options at their defaults are left out, so the bench also runs against an older library
    # (PYTHONPATH=<checkout> to time an earlier commit's sampler)
    options = {"deepcache_interval": a.deepcache_interval} if a.deepcache_interval != 1 else {}
    base = SamplerConfig(
        model=a.model, resolution=a.resolution or (256 if a.model == PAPER else d.resolution), device=a.device,
        dtype=a.dtype, channels_last=a.channels_last, compile=a.compile, m=a.m, steps=a.steps,
        inversion_steps=a.inversion_steps or a.steps, guidance=a.guidance, batch_size=a.batch_size, seed=a.seed,
        **options)
    names = a.variants or ["base"]
    imgs, caps = images(a.batch, base.resolution), captions(a.batch)
    keys = [f"k{i}" for i in range(a.batch)]
    dev = torch.device(a.device)
    runs = {}
    for name in names:
        cfg, attn = variant_config(base, name)
        t0 = time.perf_counter()
        s = build(cfg, attn)
        build_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        first_s = timed(lambda: s.generate(imgs, caps, keys), dev)  # compiles, if compile is set
        for _ in range(a.warmup):
            s.generate(imgs, caps, keys)
        runs[name] = {"sampler": s, "build_s": build_s, "first_call_s": first_s, "times_s": [],
                      "attention": type(next(iter(s.ldm.unet.attn_processors.values()))).__name__}
        print(f"  {name}: built in {build_s:.1f} s, first call {first_s:.2f} s", flush=True)
    prof = cProfile.Profile() if a.profile else None
    first = names[0]
    for it in range(a.iters):  # interleaved: every variant once per round
        for name, r in runs.items():
            s = r["sampler"]
            with (prof if prof is not None and it == 0 and name == first else contextlib.nullcontext()):
                r["times_s"].append(timed(lambda: s.generate(imgs, caps, keys), dev))
    n = a.batch * base.m
    import edsam_online

    result = {"subcommand": "sampler", "model": runs[first]["sampler"].ldm.model_id, "resolution": base.resolution,
              "library": str(Path(edsam_online.__file__).parent),
              "device": a.device, "batch": a.batch, "m": base.m, "steps": base.steps,
              "inversion_steps": base.inversion_steps, "guidance": base.guidance, "batch_size": base.batch_size,
              "warmup": a.warmup, "iters": a.iters, "variants": {}, "machine": _machine()}
    for name, r in runs.items():
        med = statistics.median(r["times_s"])
        cfg = r["sampler"].cfg
        result["variants"][name] = {
            "dtype": cfg.dtype, "channels_last": cfg.channels_last, "compile": cfg.compile,
            "deepcache_interval": getattr(cfg, "deepcache_interval", 1), "attention": r["attention"],
            "build_s": r["build_s"],
            "first_call_s": r["first_call_s"], "times_s": r["times_s"], "median_s": med, "samples_per_s": n / med,
            "peak_cuda_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        }
    base_rate = result["variants"][first]["samples_per_s"]
    for v in result["variants"].values():
        v["ratio"] = v["samples_per_s"] / base_rate
    result["samples_per_s"] = base_rate
    print(f"\n{result['model']}, {base.resolution} px, {a.device}, {torch.get_num_threads()} threads, {a.batch} images "
          f"x M = {base.m}, {base.inversion_steps}/{base.steps} steps, guidance {base.guidance}, UNet chunks of "
          f"{base.batch_size}; median of {a.iters} interleaved rounds after {a.warmup} warm-up")
    print(f"{'variant':<16} {'dtype':>5} {'attention':>16} {'first call s':>12} {'median s':>9} {'samples/s':>10} "
          f"{'ratio':>6}")
    for name, v in result["variants"].items():
        print(f"{name:<16} {v['dtype']:>5} {v['attention']:>16} {v['first_call_s']:12.2f} {v['median_s']:9.3f} "
              f"{v['samples_per_s']:10.3f} {v['ratio']:6.3f}")
    if prof is not None:
        prof.dump_stats(a.profile)
        print(f"\ncProfile of {first}'s first timed call -> {a.profile}")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return result


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p, model: str, resolution: int | None):
        p.add_argument("--model", default=model, help="a SamplerConfig.model name")
        p.add_argument("--resolution", type=int, default=resolution)
        p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        p.add_argument("--seed", type=int, default=0, help="weights of tiny-random and random: models")
        p.add_argument("--json", default=None, help="write the result here")

    d = SamplerConfig()
    p = sub.add_parser("components", help="time each network call; compose the paper setting's per-sample cost")
    common(p, PAPER, 256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--m", type=int, default=10, help="the setting to compose (paper: 10)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inversion-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=d.guidance)

    p = sub.add_parser("vs-pipeline", help="EDSAMSampler against LDMTextToImagePipeline for the same work")
    common(p, PAPER, 256)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="inversion and sampling steps")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--rho", type=float, default=d.rho)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="the sampler's UNet chunk")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")

    p = sub.add_parser("sampler", help="samples/s of EDSAMSampler.generate (and ratios of --variants)")
    common(p, d.model, None)
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--deepcache-interval", type=int, default=getattr(d, "deepcache_interval", 1),
                   help="1 = off (SamplerConfig.deepcache_interval)")
    p.add_argument("--batch", type=int, default=8, help="source images per generate call")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="UNet chunk (SamplerConfig.batch_size)")
    p.add_argument("--m", type=int, default=d.m)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--inversion-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--iters", type=int, default=5, help="timed calls (rounds, with --variants)")
    p.add_argument("--variants", nargs="+", default=None, help=f"time these on top of the flags: {VARIANTS}")
    p.add_argument("--profile", default=None, help="cProfile the first variant's first timed call into this file")

    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run = {"components": components, "vs-pipeline": vs_pipeline, "sampler": sampler_bench}[a.cmd]
    _write_json(a.json, run(a))


if __name__ == "__main__":
    main()
