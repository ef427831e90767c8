"""Latent diffusion wrapper built from diffusers components, and its loading/saving.

Why not call ``StableDiffusionPipeline`` / ``LDMTextToImagePipeline`` directly: ED-SAM needs
the pieces those pipelines fuse together, separately (encode to the VAE posterior mean,
DDIM *inversion* without guidance, a latent transformation between inversion and sampling,
and sampling from given latents with batched guidance), for one model of either layout.
The components, the schedulers and the folder layouts are diffusers' own.

DDIM pairing (checked by ``tests/test_ddim.py`` with an analytic noise predictor):
the sampling scheduler is ``DDIMScheduler.from_config(cfg, clip_sample=False)`` and the
inverse one ``DDIMInverseScheduler.from_config(<same config>, clip_sample=False)``. With the
same ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` the inverse walks exactly
the noise levels the sampler walks back: inverse ``initial_alpha_cumprod`` equals the
sampler's ``final_alpha_cumprod`` (1 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``), and
its last level is the sampler's first timestep. The only error left is DDIM inversion's
own (the noise is predicted at the previous level), which falls as steps grow.
``clip_sample`` is forced off for both: latents are not confined to [-1, 1].
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    LDMTextToImagePipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from diffusers.utils import is_accelerate_available
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from edsam_online.diffusion.config import SamplerConfig
from edsam_online.runtime import PRECISION_DTYPES as DTYPES

# folder layout name -> (vae subfolder, text encoder subfolder)
LAYOUTS = {"sd": ("vae", "text_encoder"), "compvis": ("vqvae", "bert")}
_VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
_TEXT_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    "LDMBertModel": LDMBertModel,
}

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ModelNotAvailableError(OSError):
    """Weights for a latent diffusion model could not be found locally or fetched."""


def ddim_invert(noise_fn: NoiseFn, scheduler: DDIMInverseScheduler, z0: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (no guidance); ``noise_fn(z, t) -> eps``."""
    scheduler.set_timesteps(steps, device=z0.device)
    z = z0.float()
    for t in scheduler.timesteps:
        z = scheduler.step(noise_fn(z, t).float(), t, z).prev_sample
    return z


def ddim_sample(noise_fn: NoiseFn, scheduler: DDIMScheduler, z_t: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) x_T -> x_0; ``noise_fn(z, t) -> eps``."""
    scheduler.set_timesteps(steps, device=z_t.device)
    z = z_t.float()
    for t in scheduler.timesteps:
        z = scheduler.step(noise_fn(z, t).float(), t, z, eta=0.0).prev_sample
    return z


class LatentDiffusion:
    """A text-conditional latent diffusion model: encode, embed, invert, sample, decode.

    ``cfg`` (a :class:`~edsam_online.diffusion.config.SamplerConfig`; None: its defaults)
    gives how it runs: ``device``; ``dtype``, the autocast dtype for the networks ("fp32" =
    no autocast; latents and the scheduler arithmetic stay float32); ``channels_last``;
    ``compile``; ``timestep_spacing`` (None: the model's own); and DeepCache. ``unet_calls``
    counts rows through the UNet (a guided step on a batch of n latents counts 2n), the unit
    of the paper's cost figures.

    ``deepcache_interval`` > 1 turns on DeepCache (Ma et al., CVPR 2024; the ``DeepCache``
    package, extra ``edsam-online[deepcache]``) for *sampling* only: of every
    ``deepcache_interval`` DDIM steps the first runs the whole UNet, the others reuse its deep
    features and recompute only the shallow branch ``deepcache_branch`` (0 = the outermost
    block pair). Inversion always runs the whole UNet: it has to reconstruct. The package's
    ``DeepCacheSDHelper`` only needs an object with the ``unet`` and the ``scheduler`` whose
    ``timesteps`` the loop walks, so it wraps this loop as it wraps a diffusers pipeline.
    Skipped steps still count in ``unet_calls``.
    """

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config, *, model_id: str = "",
                 layout: str = "sd", cfg: SamplerConfig | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        cfg = cfg or SamplerConfig()
        if cfg.deepcache_interval > 1:  # SamplerConfig refuses it with compile
            try:
                import DeepCache  # noqa: F401
            except ImportError as err:
                raise ImportError("deepcache_interval > 1 needs the DeepCache package: "
                                  "pip install 'edsam-online[deepcache]'") from err
        self.device = torch.device(cfg.device)
        self.autocast_dtype = DTYPES[cfg.dtype]
        self.model_id, self.layout = model_id, layout
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.channels_last = cfg.channels_last
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self._unet_fn = torch.compile(self.unet) if cfg.compile else self.unet
        # timestep_spacing None keeps the model's own (its scheduler config); both schedulers
        # share it, so the inversion still walks the levels the sampler walks back.
        spacing = {} if cfg.timestep_spacing is None else {"timestep_spacing": cfg.timestep_spacing}
        self.scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, **spacing)
        self.inverse_scheduler = DDIMInverseScheduler.from_config(self.scheduler.config, clip_sample=False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
        self.unet_calls = 0
        self._uncond: torch.Tensor | None = None
        self.deepcache_interval, self.deepcache_branch = int(cfg.deepcache_interval), int(cfg.deepcache_branch)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> scaled latents (VAE posterior mean: deterministic)."""
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if isinstance(self.vae, VQModel):
                z = self.vae.encode(x).latents
            else:
                z = self.vae.encode(x).latent_dist.mean
        return z.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 images [B, H, W, 3] (numpy)."""
        z = latents / self.scaling_factor
        with self._autocast():
            x = self.vae.decode(z).sample
        x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        """Captions -> text-encoder hidden states [B, L, D] (float32)."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with self._autocast():
            h = self.text_encoder(ids)[0]
        return h.float()

    def uncond_embedding(self, n: int) -> torch.Tensor:
        """The empty-caption embedding repeated n times (computed once)."""
        if self._uncond is None:
            self._uncond = self.embed([""])
        return self._uncond.expand(n, -1, -1)

    @torch.no_grad()
    def predict_noise(self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        self.unet_calls += z.shape[0]
        with self._autocast():
            eps = self._unet_fn(z, t, encoder_hidden_states=emb).sample
        return eps.float()

    def guided_noise_fn(self, cond: torch.Tensor, guidance: float) -> NoiseFn:
        """eps(z, t) with classifier-free guidance: cond and uncond rows in one UNet batch."""
        if guidance == 1.0:
            return lambda z, t: self.predict_noise(z, t, cond)
        both = torch.cat([self.uncond_embedding(cond.shape[0]).to(cond.dtype), cond])

        def fn(z, t):
            eps_u, eps_c = self.predict_noise(torch.cat([z, z]), t, both).chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        return fn

    def invert(self, latents: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM inversion conditioned on the caption, WITHOUT guidance (guidance breaks reconstruction)."""
        return ddim_invert(lambda z, t: self.predict_noise(z, t, cond), self.inverse_scheduler, latents, steps)

    def sample(self, z_t: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
        """DDIM sampling from z_t with classifier-free guidance ``guidance`` (1 = none)."""
        if self.deepcache_interval == 1:
            return ddim_sample(self.guided_noise_fn(cond, guidance), self.scheduler, z_t, steps)
        from DeepCache import DeepCacheSDHelper

        cache = DeepCacheSDHelper(pipe=SimpleNamespace(unet=self.unet, scheduler=self.scheduler))
        cache.set_params(cache_interval=self.deepcache_interval, cache_branch_id=self.deepcache_branch)
        cache.enable()  # a fresh cache per call: the first step of every chunk runs the whole UNet
        try:
            return ddim_sample(self.guided_noise_fn(cond, guidance), self.scheduler, z_t, steps)
        finally:
            cache.disable()

    def components(self) -> dict:
        return dict(vae=self.vae, unet=self.unet, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, scheduler=self.scheduler)

    def save_pretrained(self, path: str | os.PathLike, layout: str | None = None) -> None:
        """Save in diffusers' folder layout ("sd": vae/ unet/ text_encoder/ tokenizer/ scheduler/;
        "compvis": vqvae/ bert/ tokenizer/ unet/ scheduler/) with its model_index.json."""
        save_components(self.components(), path, layout or self.layout)


def save_components(c: dict, path: str | os.PathLike, layout: str = "sd") -> None:
    if layout == "sd":
        pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                       unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    elif layout == "compvis":
        pipe = LDMTextToImagePipeline(vqvae=c["vae"], bert=c["text_encoder"], tokenizer=c["tokenizer"],
                                      unet=c["unet"], scheduler=c["scheduler"])
    else:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    pipe.save_pretrained(str(path))


def _offline_help(path_or_id: str, err: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return ModelNotAvailableError(
        f"latent diffusion weights {path_or_id!r} were not found locally and could not be downloaded"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ' (this machine may be offline)'}: {err}. "
        "Provide a local folder in the Stable Diffusion layout (vae/ unet/ text_encoder/ tokenizer/ "
        "scheduler/ model_index.json) or the CompVis LDM layout (vqvae/ bert/ tokenizer/ unet/ scheduler/), "
        "e.g. one written by `huggingface-cli download CompVis/ldm-text2im-large-256 --local-dir DIR` on a "
        "connected machine, or use model='retrained' to train a small LDM here."
    )


def _read_index(path_or_id: str, cache_dir: str | None) -> tuple[dict, bool]:
    """model_index.json of a folder or hub repo; returns (index, is_local)."""
    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        f = folder / "model_index.json"
        if f.is_file():
            return json.loads(f.read_text()), True
        # a folder without model_index.json: infer from its subfolders
        index = {name: None for name in ("vae", "vqvae", "text_encoder", "bert", "unet", "tokenizer", "scheduler")
                 if (folder / name).is_dir()}
        return index, True
    if folder.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise ModelNotAvailableError(
            f"{path_or_id!r} is neither a model folder nor a hub id (owner/name); expected a folder with "
            "model_index.json in the Stable Diffusion or CompVis LDM layout")
    from huggingface_hub import hf_hub_download

    try:
        f = hf_hub_download(path_or_id, "model_index.json", cache_dir=cache_dir)
    except Exception as err:  # hub errors, OSError, connection errors: all mean "not available here"
        raise _offline_help(path_or_id, err) from err
    return json.loads(Path(f).read_text()), False


def detect_layout(index: dict) -> str:
    if "vqvae" in index or "bert" in index:
        return "compvis"
    if "vae" in index and "text_encoder" in index:
        return "sd"
    raise ModelNotAvailableError(
        f"unrecognised model layout with components {sorted(index)}: expected vae/ text_encoder/ "
        "(Stable Diffusion) or vqvae/ bert/ (CompVis LDM)")


def _class_of(index: dict, name: str, folder: Path | None, table: dict, default):
    entry = index.get(name)
    cls_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if cls_name is None and folder is not None and (folder / name / "config.json").is_file():
        cfg = json.loads((folder / name / "config.json").read_text())
        cls_name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if cls_name is None:
        return default
    if cls_name not in table:
        raise ModelNotAvailableError(f"unsupported {name} class {cls_name!r}; supported: {sorted(table)}")
    return table[cls_name]


def load_components(path_or_id: str, cache_dir: str | None = None) -> tuple[dict, str]:
    """Load (components, layout) with each component's own ``from_pretrained``."""
    index, local = _read_index(str(path_or_id), cache_dir)
    layout = detect_layout(index)
    vae_dir, text_dir = LAYOUTS[layout]
    folder = Path(path_or_id).expanduser() if local else None
    src = str(folder) if local else str(path_or_id)
    kw = dict(cache_dir=cache_dir) if not local else {}
    try:
        vae_cls = _class_of(index, vae_dir, folder, _VAE_CLASSES, AutoencoderKL)
        text_cls = _class_of(index, text_dir, folder, _TEXT_CLASSES,
                             LDMBertModel if layout == "compvis" else CLIPTextModel)
        # Networks load in float32 whatever dtype their files store (the retrained LDM ships
        # in fp16); LatentDiffusion lowers precision with autocast only. Low-memory loading
        # needs accelerate: asked for only where it is installed (else diffusers warns per model).
        lean = dict(torch_dtype=torch.float32, low_cpu_mem_usage=is_accelerate_available(), **kw)
        comps = dict(
            vae=vae_cls.from_pretrained(src, subfolder=vae_dir, **lean),
            unet=UNet2DConditionModel.from_pretrained(src, subfolder="unet", **lean),
            text_encoder=text_cls.from_pretrained(src, subfolder=text_dir, dtype=torch.float32, **kw),
            tokenizer=AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            scheduler=DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw),
        )
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as err:
        raise _offline_help(str(path_or_id), err) from err
    return comps, layout


def load_ldm(path_or_id: str | os.PathLike, *, cache_dir: str | None = None, model_id: str | None = None,
             cfg: SamplerConfig | None = None) -> LatentDiffusion:
    """Load a text-to-image LDM from a folder or hub id, auto-detecting the SD or CompVis layout;
    ``cfg`` says how it runs (see :class:`LatentDiffusion`)."""
    comps, layout = load_components(str(path_or_id), cache_dir=cache_dir)
    return LatentDiffusion(comps["vae"], comps["unet"], comps["text_encoder"], comps["tokenizer"],
                           comps["scheduler"].config, model_id=model_id or str(path_or_id), layout=layout, cfg=cfg)


def build_tiny_ldm(cfg: SamplerConfig | None = None, layout: str = "sd") -> LatentDiffusion:
    """A random-weight tiny LDM in memory (tests, smoke runs) at ``cfg.resolution``, its weights
    drawn from ``cfg.seed``; ``cfg`` also says how it runs (see :class:`LatentDiffusion`)."""
    from edsam_online.diffusion.tiny import tiny_components

    cfg = cfg or SamplerConfig()
    c = tiny_components(cfg.resolution, cfg.seed, layout)
    return LatentDiffusion(c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"].config,
                           model_id=f"tiny-random-{layout}-{cfg.resolution}-seed{cfg.seed}", layout=layout, cfg=cfg)
