"""Retrain a small text-conditional LDM on the built-in source domain (the paper's "Retrained-LDM").

    python -m edsam_online.diffusion.train_ldm --out DIR [--vae-steps N] [--unet-steps N] [--<any setting> V]

With the defaults this writes the model that ships in ``edsam_online/diffusion/weights/``
(about 29 minutes on 2 cores; a fixed number of steps from ``seed``, so the same config
writes the same files however fast the machine is). Two stages on CPU at 32 px:

1. An AutoencoderKL (32 px -> 16x16x4 latents), trained as a deterministic
   autoencoder on the posterior *mean* with a small KL term. Training on posterior
   samples from the start (as SD's VAE does) lets the unit-variance noise of a fresh
   encoder swamp its small means, and the decoder then settles on blurry averages
   within this budget; the sampler encodes with the mean anyway.
   A downsampling factor of 2, not SD's 8: at 32 px a 4x-downsampling VAE trained for
   minutes loses the points of a star and the corners of a hexagon (measured: a
   classifier recognised 75% of its reconstructions, 87% at factor 2 after 300 steps).
   1600 steps: at 400 the decoder turned 13% of colours into others (red, yellow -> orange).
2. With the VAE frozen and latents cached, a UNet2DConditionModel trained jointly
   with a tiny CLIP text encoder (offline BPE tokenizer) on epsilon prediction,
   dropping 10% of captions for classifier-free guidance, with an EMA of the UNet.
   The caption enters through cross-attention and also, attention-pooled, through the
   time embedding of every ResNet block (diffusers' ``addition_embed_type="text"``
   with scale-shift). Half (``grid_share``) of each batch's timesteps are drawn from the
   10-step DDIM grid (t = 1, 101, ..., 901, which contains the 5-step grid t = 1, 201, ...,
   801), half uniformly, so the steps affordable on a CPU go where generation evaluates
   the UNet while other step counts still work.
   8000 steps: the UNet learns to read the caption with training length. With guidance 3,
   pure sampling kept the class in 20% of samples after 1600 steps, 56% after 3000 and 85%
   after 8000 (BENCHMARKS.md has the trials and what else they changed). Tried in
   800-step trials and not kept: a text encoder pre-trained to predict class, color and
   size from the caption (no gain), v-prediction with min-SNR weighting, all timesteps on
   the DDIM grid (within noise), ``torch.compile`` (14% faster steps, 226 s to compile).

The weights are saved in fp16 (``storage_dtype``), the Stable Diffusion layout, and load
through ``load_ldm`` in fp32. ``model="retrained"`` loads the shipped folder when its
recipe version is the code's, and otherwise trains into its cache folder on first use.
Every caption is the full built-in caption (class, color, size), so generation can be
conditioned on all of it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from edsam_online.diffusion.pipeline import save_components
from edsam_online.diffusion.tiny import offline_clip_tokenizer

log = logging.getLogger(__name__)

#: Bumped whenever this module's code changes what a config trains, so that the recipe version
#: (:func:`recipe_version`) changes with the code as well as with the settings.
RECIPE_REVISION = 2

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class TrainLDMConfig:
    out_dir: str
    resolution: int = 32
    num_train: int = 8000  # rendered source-domain images (index 0..num_train-1, seed below)
    data_seed: int = 0
    seed: int = 0
    vae_steps: int = 1600
    unet_steps: int = 8000
    batch_size: int = 64  # VAE stage
    unet_batch_size: int = 32
    vae_lr: float = 3e-3
    unet_lr: float = 2e-3
    latent_channels: int = 4
    grid_steps: int = 10  # the DDIM step count whose timesteps get ``grid_share`` of the training draws
    grid_share: float = 0.5
    # DDIM's spacing of sampling timesteps, saved in the scheduler config the sampler and its
    # inversion read: "leading" starts 5 steps at t = 801 (signal coefficient 0.19), so pure
    # sampling starts from noise the UNet never saw at that level; "trailing" starts at t = 999 (0.07).
    timestep_spacing: str = "leading"
    kl_weight: float = 1e-6
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    num_threads: int = 2
    # Dtype of the saved weights. "fp16" halves the folder (the text encoder's 49408-token
    # embedding is most of it) so the shipped model stays small; loading casts back to fp32.
    storage_dtype: str = "fp16"

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must name the output folder, got {self.out_dir!r}")
        for name in ("resolution", "num_train", "vae_steps", "unet_steps", "batch_size", "unet_batch_size", "num_threads",
                     "latent_channels", "grid_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4, got {self.resolution}")
        if not 0 <= self.grid_share <= 1:
            raise ValueError(f"grid_share must be in [0, 1], got {self.grid_share}")
        if self.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"timestep_spacing must be 'leading' or 'trailing', got {self.timestep_spacing!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def recipe_version(cfg: TrainLDMConfig) -> str:
    """A short hash of everything that determines the trained weights: the settings (not the
    output folder) and :data:`RECIPE_REVISION`. The retrained LDM's cache folder is named by
    it, so a changed recipe trains a new model instead of loading the old one."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    blob = json.dumps({"revision": RECIPE_REVISION, **settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def build_components(resolution: int = 32, latent_channels: int = 4, timestep_spacing: str = "leading") -> dict:
    """Untrained components of the retrained LDM (resolution/2 latents, ``latent_channels`` deep)."""
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, layers_per_block=1,
        norm_num_groups=8, sample_size=resolution, mid_block_add_attention=False,
    )
    tokenizer = offline_clip_tokenizer(max_length=24)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=16, norm_num_groups=16,
        # The caption also enters every ResNet block: attention-pooled into the time embedding
        # (diffusers' "text" addition embedding, as in Imagen), applied as scale and shift.
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing=timestep_spacing)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def render_source(cfg: TrainLDMConfig) -> tuple[torch.Tensor, list[str]]:
    """The built-in source domain as float images in [-1, 1] [N, 3, H, W] and their captions."""
    from edsam_online.data.shapes import SOURCE_DOMAIN, render_sample

    samples = [render_sample(i, SOURCE_DOMAIN, cfg.resolution, cfg.data_seed) for i in range(cfg.num_train)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption for s in samples]


def _lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae: AutoencoderKL, x: torch.Tensor, cfg: TrainLDMConfig, g: torch.Generator) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="train_ldm vae", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        batch = x[torch.randint(0, len(x), (cfg.batch_size,), generator=g)]
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.mean).sample
        loss_rec = F.l1_loss(rec, batch) + F.mse_loss(rec, batch)
        loss = loss_rec + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            bar.set_postfix(rec=f"{loss_rec.item():.4f}")
            log.info("vae step %d rec %.4f", step, loss_rec.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + bs]).latent_dist.mean for i in range(0, len(x), bs)])


def train_unet(c: dict, latents: torch.Tensor, captions: list[str], cfg: TrainLDMConfig,
               g: torch.Generator) -> torch.nn.Module:
    unet, text_encoder, tokenizer, sched = c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    acp = sched.alphas_cumprod
    grid_sched = DDIMScheduler.from_config(sched.config)
    grid_sched.set_timesteps(cfg.grid_steps)
    grid = grid_sched.timesteps.long()
    unet.train()
    text_encoder.train()
    bar = tqdm(range(cfg.unet_steps), desc="train_ldm unet", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr)
        idx = torch.randint(0, len(latents), (cfg.unet_batch_size,), generator=g)
        z0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(cfg.unet_batch_size, generator=g) < cfg.caption_dropout
        ids[drop] = empty
        t = torch.randint(0, len(acp), (cfg.unet_batch_size,), generator=g)
        on_grid = torch.rand(cfg.unet_batch_size, generator=g) < cfg.grid_share
        t[on_grid] = grid[torch.randint(0, len(grid), (int(on_grid.sum()),), generator=g)]
        noise = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0 or step == cfg.unet_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("unet step %d loss %.4f", step, loss.item())
    return ema.eval()


def train_ldm(cfg: TrainLDMConfig) -> Path:
    """Train and save the retrained LDM under ``cfg.out_dir`` (written atomically); returns the path.

    The folder holds only what the training settings determine (no timings, not its own path),
    so two runs of one config write identical files."""
    out = Path(cfg.out_dir).expanduser()
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        c = build_components(cfg.resolution, cfg.latent_channels, cfg.timestep_spacing)
        x, captions = render_source(cfg)
        train_vae(c["vae"], x, cfg, g)
        latents = encode_all(c["vae"], x)
        scale = 1.0 / latents.std().item()
        c["vae"].register_to_config(scaling_factor=scale)
        c["unet"] = train_unet(c, latents * scale, captions, cfg, g)
        c["text_encoder"].eval()
        for name in ("vae", "unet", "text_encoder"):
            c[name].to(STORAGE_DTYPES[cfg.storage_dtype])
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_components(c, tmp, "sd")
        settings = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}  # the folder may move
        (tmp / "train_ldm_config.json").write_text(json.dumps(
            {**settings, "revision": RECIPE_REVISION, "version": recipe_version(cfg), "scaling_factor": scale},
            indent=1))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        torch.set_num_threads(threads)
    log.info("train_ldm: saved %s in %.1f s", out, time.monotonic() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True,
                   help="output folder; diffusion.model=retrained loads <cache_dir>/retrained-ldm-<res>px-<version>")
    for f in fields(TrainLDMConfig):  # every recipe setting, --vae-steps for vae_steps (defaults: the dataclass's)
        if f.name != "out_dir":
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = train_ldm(TrainLDMConfig(out_dir=a.pop("out"), **a))
    print(out)


if __name__ == "__main__":
    main()
