"""Retrain a small text-conditional LDM on a corpus of your own (the paper's "Retrained-LDM").

    python -m edsam_online.diffusion.train_ldm --out DIR [--data-kind builtin|webdataset|csv|imagefolder]
        [--data-path P] [--data-domain world] [--num-train N] [--vae-steps N] [--unet-steps N] [--<any setting> V]

With the defaults this writes the model that ships in ``edsam_online/diffusion/weights/``: the
built-in *world* corpus (``data.domain=world``: the source's content in seven styles, a prior
wider than the trainer's ``flat`` data, as LAION is wider than CC3M). A fixed number of steps
from ``seed``, so the same config and data write the same files however fast the machine is.
Any data source the project reads trains it (webdataset shards, a CSV, an ImageFolder with
``.txt`` captions): the first ``num_train`` decodable samples, resized to ``resolution``.
The recipe version names the model's folder and hashes the settings *and* the data
(:func:`data_identity`), so changed data trains anew. A checkpoint is written
every ``checkpoint_every`` steps to ``<out>.partial/``; run the same command again to resume an
interrupted training where it stopped (the result is the same files as an uninterrupted run).
Two stages on CPU at 32 px:

1. An AutoencoderKL (32 px -> 16x16x4 latents), trained as a deterministic
   autoencoder on the posterior *mean* with a small KL term. Training on posterior
   samples from the start (as SD's VAE does) lets the unit-variance noise of a fresh
   encoder swamp its small means, and the decoder then settles on blurry averages
   within this budget; the sampler encodes with the mean anyway.
   A downsampling factor of 2, not SD's 8: at 32 px a 4x-downsampling VAE trained for
   minutes loses the points of a star and the corners of a hexagon (measured: a
   classifier recognised 75% of its reconstructions, 87% at factor 2 after 300 steps).
   2000 steps (1600 sufficed for the source alone; at 400 the decoder turned 13% of its
   colours into others, red and yellow into orange).
2. With the VAE frozen and latents cached, a UNet2DConditionModel (channels 48, 96, 96)
   trained jointly with a tiny CLIP text encoder (offline BPE tokenizer) on epsilon
   prediction, dropping 10% of captions for classifier-free guidance, with an EMA of the UNet.
   The caption enters through cross-attention and also, attention-pooled, through the
   time embedding of every ResNet block (diffusers' ``addition_embed_type="text"``
   with scale-shift). Half (``grid_share``) of each batch's timesteps are drawn from the
   10-step DDIM grid of the saved spacing (trailing: t = 99, 199, ..., 999, which contains
   the 5-step grid t = 199, 399, ..., 999), half uniformly, so the steps affordable on a CPU
   go where generation evaluates the UNet while other step counts still work.
   The UNet learns to read the caption with training length: on the source alone, with
   guidance 3, pure sampling kept the class in 20% of samples after 1600 steps, 56% after
   3000 and 85% after 8000 (docs/history.md). Seven styles share the world's capacity, so the
   world recipe widens the UNet (from 32, 64, 64) and trains 11000 steps, within the 2-hour
   budget of a 2-core machine. Tried in 800-step trials and not kept: a text encoder
   pre-trained to predict class, color and size from the caption (no gain), v-prediction
   with min-SNR weighting, all timesteps on the DDIM grid (within noise), ``torch.compile``
   (14% faster steps, 226 s to compile).

The weights are saved in fp16 (``storage_dtype``), the Stable Diffusion layout, and load
through ``load_ldm`` in fp32. ``model="retrained"`` loads the shipped folder when its
recipe version is the code's, and otherwise trains into its cache folder on first use.
Every built-in caption names class, color and size, so generation can be conditioned on
all of it; half of the world's captions name no style (:mod:`edsam_online.data.domains`).
"""

from __future__ import annotations

import argparse
import copy
import functools
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

from edsam_online.diffusion.pipeline import save_components
from edsam_online.diffusion.tiny import (offline_clip_tokenizer, sd_ddim_scheduler, small_clip_text_encoder,
                                         small_kl_vae)
from edsam_online.validation import require_at_least

log = logging.getLogger(__name__)

#: Bumped whenever this module's code changes what a config trains, so that the recipe version
#: (:func:`recipe_version`) changes with the code as well as with the settings.
RECIPE_REVISION = 3

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class TrainLDMConfig:
    out_dir: str
    resolution: int = 32
    # The corpus: a RealDataConfig's kind, path and built-in domain (``world``: every world style).
    data_kind: str = "builtin"
    data_path: str = ""
    data_domain: str = "world"
    num_train: int = 14000  # the first this many decodable samples (2000 per world style)
    data_seed: int = 0
    seed: int = 0
    vae_steps: int = 2000
    unet_steps: int = 11000
    batch_size: int = 64  # VAE stage
    unet_batch_size: int = 32
    vae_lr: float = 3e-3
    unet_lr: float = 2e-3
    latent_channels: int = 4
    grid_steps: int = 10  # the DDIM step count whose timesteps get ``grid_share`` of the training draws
    grid_share: float = 0.5
    # DDIM's spacing of sampling timesteps, saved in the scheduler config the sampler and its
    # inversion read (SamplerConfig.timestep_spacing may override it): "leading" starts 5 steps at
    # t = 801 (signal coefficient 0.19), "trailing" at t = 999 (0.07), so a trailing inversion
    # reaches deeper noise and the transport's shift moves a sample's global style further.
    timestep_spacing: str = "trailing"
    kl_weight: float = 1e-6
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    num_threads: int = 2
    checkpoint_every: int = 1000  # steps between resumable checkpoints in <out>.partial/ (0 = none)
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
        require_at_least(self, 0, "checkpoint_every")
        self.data_config()  # a bad data_kind, data_path or data_domain fails here, naming it
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


    def data_config(self):
        """The corpus as the project's data sources read it: in order, one epoch, no shuffle."""
        from edsam_online.data import RealDataConfig

        try:
            return RealDataConfig(kind=self.data_kind, path=self.data_path or None, domain=self.data_domain,
                                  resolution=self.resolution, seed=self.data_seed, length=self.num_train,
                                  shuffle=False, epochs=1)
        except ValueError as err:
            raise ValueError(f"data_{err}") from None


# Settings that change how training runs but not what it writes.
_NOT_RECIPE = ("out_dir", "num_threads", "checkpoint_every")


def _settings(cfg: TrainLDMConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECIPE}


def load_corpus(cfg: TrainLDMConfig) -> tuple[torch.Tensor, list[str]]:
    """The training corpus: the first ``num_train`` decodable samples of the data source as
    float images in [-1, 1] ``[N, 3, H, W]`` and their captions. Fewer is an error."""
    from edsam_online.data import iter_real_samples

    images, captions = [], []
    try:
        for sample in iter_real_samples(cfg.data_config()):
            images.append(sample.image)
            captions.append(sample.caption)
            if len(images) == cfg.num_train:
                break
    except ValueError as err:  # an epoch that decodes to nothing
        raise ValueError(f"data_path: {err}") from None
    if len(images) < cfg.num_train:
        raise ValueError(f"num_train: the data holds {len(images)} decodable samples, fewer than {cfg.num_train}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, captions


def data_fingerprint(x: torch.Tensor, captions: list[str]) -> str:
    """sha256 of the corpus as trained on (pixels and captions, in order), 12 hex digits."""
    h = hashlib.sha256(x.numpy().tobytes())
    for caption in captions:
        h.update(caption.encode() + b"\0")
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _fingerprint_of(settings_json: str) -> str:
    cfg = TrainLDMConfig(out_dir="-", **json.loads(settings_json))
    return data_fingerprint(*load_corpus(cfg))


def data_identity(cfg: TrainLDMConfig, fingerprint: str | None = None) -> str:
    """What the recipe version hashes of the data. Files (webdataset, CSV, ImageFolder): their
    content, :func:`data_fingerprint` (read once per process when not given). Built-in data:
    the renderer's :data:`~edsam_online.data.shapes.RENDER_REVISION`, since its settings are
    in the recipe already; its pixels can move by a grey level with a Pillow or NumPy release,
    and that must not make every user retrain the shipped model (a test holds the shipped
    model's recorded pixel fingerprint against today's renders instead)."""
    if cfg.data_kind == "builtin":
        from edsam_online.data.shapes import RENDER_REVISION

        return f"builtin-r{RENDER_REVISION}"
    return fingerprint or _fingerprint_of(json.dumps(_settings(cfg), sort_keys=True))


def recipe_version(cfg: TrainLDMConfig, fingerprint: str | None = None) -> str:
    """A short hash of everything that determines the trained weights: the settings (not the
    output folder), :data:`RECIPE_REVISION` and the data (:func:`data_identity`). The
    retrained LDM's folder is named by it, so a changed recipe or changed data trains a new
    model instead of loading the old one."""
    blob = json.dumps({"revision": RECIPE_REVISION, "data": data_identity(cfg, fingerprint), **_settings(cfg)},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def build_components(resolution: int, latent_channels: int, timestep_spacing: str) -> dict:
    """Untrained components of the retrained LDM (resolution/2 latents, ``latent_channels`` deep)."""
    vae = small_kl_vae((16, 32), latent_channels, resolution)
    tokenizer = offline_clip_tokenizer(max_length=24)
    text_encoder = small_clip_text_encoder(tokenizer, hidden_size=64, layers=2, heads=4)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=1, block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=16, norm_num_groups=16,
        # The caption also enters every ResNet block: attention-pooled into the time embedding
        # (diffusers' "text" addition embedding, as in Imagen), applied as scale and shift.
        addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
    )
    scheduler = sd_ddim_scheduler(timestep_spacing)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Checkpoints:
    """Resumable state of one training in ``<out>.partial/state.pt``, written atomically every
    ``checkpoint_every`` steps of either stage. Loaded with ``torch.load(weights_only=True)``
    (tensors and plain containers only), and only when it is of the same recipe version."""

    def __init__(self, out: Path, version: str, every: int):
        self.path, self.version, self.every = out.with_name(out.name + ".partial") / "state.pt", version, every

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("version") != self.version:
            log.warning("train_ldm: ignoring %s of another recipe version (%s, not %s)",
                        self.path, state.get("version"), self.version)
            return None
        log.info("train_ldm: resuming the %s stage at step %d from %s", state["stage"], state["step"], self.path)
        return state

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step + 1) % self.every == 0 and step + 1 < total

    def save(self, stage: str, step: int, g: torch.Generator, **state) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"version": self.version, "stage": stage, "step": step, "rng": g.get_state(), **state}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def train_vae(vae: AutoencoderKL, x: torch.Tensor, cfg: TrainLDMConfig, g: torch.Generator,
              ckpt: _Checkpoints, resume: dict | None = None) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if resume is not None:
        vae.load_state_dict(resume["vae"])
        opt.load_state_dict(resume["opt"])
        start = resume["step"]
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), desc="train_ldm vae", total=cfg.vae_steps, initial=start, mininterval=5)
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
        if ckpt.due(step, cfg.vae_steps):
            ckpt.save("vae", step + 1, g, vae=vae.state_dict(), opt=opt.state_dict())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + bs]).latent_dist.mean for i in range(0, len(x), bs)])


def train_unet(c: dict, latents: torch.Tensor, captions: list[str], cfg: TrainLDMConfig,
               g: torch.Generator, ckpt: _Checkpoints, resume: dict | None = None) -> torch.nn.Module:
    unet, text_encoder, tokenizer, sched = c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01, fused=True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    start = 0
    if resume is not None:
        unet.load_state_dict(resume["unet"])
        text_encoder.load_state_dict(resume["text_encoder"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        start = resume["step"]
    acp = sched.alphas_cumprod
    grid_sched = DDIMScheduler.from_config(sched.config)
    grid_sched.set_timesteps(cfg.grid_steps)
    grid = grid_sched.timesteps.long()
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="train_ldm unet", total=cfg.unet_steps, initial=start,
               mininterval=5)
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
        if ckpt.due(step, cfg.unet_steps):
            ckpt.save("unet", step + 1, g, vae=c["vae"].state_dict(), unet=unet.state_dict(),
                      text_encoder=text_encoder.state_dict(), ema=ema.state_dict(), opt=opt.state_dict())
    return ema.eval()


def train_ldm(cfg: TrainLDMConfig) -> Path:
    """Train and save the retrained LDM under ``cfg.out_dir`` (written atomically); returns the path.

    The folder holds only what the training settings and data determine (no timings, not its
    own path), so two runs of one config write identical files, resumed or not."""
    out = Path(cfg.out_dir).expanduser()
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        c = build_components(cfg.resolution, cfg.latent_channels, cfg.timestep_spacing)
        x, captions = load_corpus(cfg)
        fingerprint = data_fingerprint(x, captions)
        version = recipe_version(cfg, fingerprint)
        ckpt = _Checkpoints(out, version, cfg.checkpoint_every)
        resume = ckpt.load()
        if resume is not None:
            g.set_state(resume["rng"])
        if resume is not None and resume["stage"] == "unet":
            c["vae"].load_state_dict(resume["vae"])
            c["vae"].eval().requires_grad_(False)
        else:
            train_vae(c["vae"], x, cfg, g, ckpt, resume)
            resume = None
        latents = encode_all(c["vae"], x)
        scale = 1.0 / latents.std().item()
        c["vae"].register_to_config(scaling_factor=scale)
        c["unet"] = train_unet(c, latents * scale, captions, cfg, g, ckpt, resume)
        c["text_encoder"].eval()
        for name in ("vae", "unet", "text_encoder"):
            c[name].to(STORAGE_DTYPES[cfg.storage_dtype])
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_components(c, tmp, "sd")
        (tmp / "train_ldm_config.json").write_text(json.dumps(  # not out_dir: the folder may move
            {**_settings(cfg), "revision": RECIPE_REVISION, "data_fingerprint": fingerprint, "version": version,
             "scaling_factor": scale}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        ckpt.clear()
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
