"""The ED-SAM transport sampler: invert each real image once, transport M times, sample, decode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edsam_online.diffusion.pipeline import DTYPES, LatentDiffusion
from edsam_online.diffusion.transport import MODES, transport


@dataclass
class SamplerConfig:
    """Generator settings. Every default lives here; the groups under ``configs/diffusion/`` override.

    ``model``: a folder or hub id (SD or CompVis LDM layout), ``"tiny-random"`` (random tiny
    LDM, tests) or ``"retrained"`` (the small LDM trained on the built-in source domain,
    cached under ``cache_dir`` and trained on first use; ``None``: ``$EDSAM_CACHE`` or
    ``~/.cache/edsam-online``); see :mod:`edsam_online.diffusion.registry`.

    The defaults suit ``"retrained"`` on a CPU: 32 px, M = 4 samples per inversion, 5 DDIM
    steps for inversion and sampling and no classifier-free guidance (``guidance = 1``). On
    this small UNet, guidance and more steps lower the share of samples that keep their
    caption's class, and these settings cost a quarter of the UNet calls of 10 guided steps;
    ``scripts/ldm_fidelity.py`` measures it (results in BENCHMARKS.md). The paper's model
    (``configs/diffusion/ldm_text2im_256.yaml``) sets the paper's 10 steps, guidance and M = 10.
    """

    model: str = "retrained"
    cache_dir: str | None = None
    resolution: int = 32
    mode: str = "transport"
    rho: float = 0.5
    m: int = 4
    steps: int = 5
    inversion_steps: int = 5
    guidance: float = 1.0
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.rho >= 0 and np.isfinite(self.rho)):
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        for name in ("m", "steps", "inversion_steps", "batch_size", "resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance), got {self.guidance}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class GeneratedBatch:
    images: np.ndarray  # uint8 [B*M, H, W, 3]; rows i*M .. i*M+M-1 come from source image i
    provenance: list[dict]
    unet_calls: int


class EDSAMSampler:
    """Batched ED-SAM generation (docs/design.md, "Method"): one inversion per real image, M
    transported samples.

    Image ``i`` of a batch generated with ``seed=s`` draws its transport noise from a generator
    seeded with ``s + i`` (recorded as its provenance ``seed``), so a sample can be regenerated
    from its source image, caption, seed and ``sample_index``.
    """

    def __init__(self, ldm: LatentDiffusion, cfg: SamplerConfig):
        self.ldm, self.cfg = ldm, cfg

    def _check(self, images, captions, keys, m):
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("images must be a uint8 numpy array [B, H, W, 3], got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
        b, h, w, _ = images.shape
        if b < 1:
            raise ValueError("images must hold at least one image")
        if h < 1 or w < 1:
            raise ValueError(f"images must have a positive height and width, got {h}x{w}")
        if not isinstance(captions, (list, tuple)) or len(captions) != b:
            raise ValueError(f"captions must be a list with one caption per image ({b}), got "
                             f"{len(captions) if isinstance(captions, (list, tuple)) else type(captions).__name__}")
        if any(not isinstance(c, str) or not c.strip() for c in captions):
            raise ValueError("captions must be non-empty strings")
        if not isinstance(keys, (list, tuple)) or len(keys) != b:
            raise ValueError(f"keys must be a list with one key per image ({b})")
        if m is None:
            m = self.cfg.m
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        return int(m)

    def _resize(self, images: np.ndarray) -> np.ndarray:
        r = self.cfg.resolution
        if images.shape[1:3] == (r, r):
            return images
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def generate(self, images: np.ndarray, captions: list[str], keys: list[str],
                 m: int | None = None, seed: int = 0) -> GeneratedBatch:
        m = self._check(images, captions, keys, m)
        cfg, ldm = self.cfg, self.ldm
        calls0 = ldm.unet_calls
        images = self._resize(images)
        bs = cfg.batch_size
        z_s = []
        for i in range(0, len(images), bs):  # invert each image once
            z0 = ldm.encode(images[i:i + bs])
            cond = ldm.embed(captions[i:i + bs])
            z_s.append(ldm.invert(z0, cond, cfg.inversion_steps) if cfg.mode != "random" else z0)
        z_s = torch.cat(z_s)
        z_t, alphas = [], []
        for i in range(len(images)):
            gen = torch.Generator(device=ldm.device).manual_seed(seed + i)
            zt, a = transport(z_s[i:i + 1].expand(m, *z_s.shape[1:]), cfg.rho, cfg.mode, gen)
            z_t.append(zt)
            alphas.append(a)
        z_t, alphas = torch.cat(z_t), torch.cat(alphas)
        rep_captions = [c for c in captions for _ in range(m)]
        out = []
        for i in range(0, len(z_t), bs):
            cond = ldm.embed(rep_captions[i:i + bs])
            out.append(ldm.decode(ldm.sample(z_t[i:i + bs], cond, cfg.steps, cfg.guidance)))
        prov = [
            dict(source_key=str(keys[i]), caption=captions[i], alpha=float(alphas[i * m + j]), rho=float(cfg.rho),
                 seed=int(seed + i), sample_index=j, model_id=ldm.model_id, mode=cfg.mode, steps=cfg.steps,
                 inversion_steps=cfg.inversion_steps, guidance=float(cfg.guidance))
            for i in range(len(images)) for j in range(m)
        ]
        return GeneratedBatch(images=np.concatenate(out), provenance=prov, unet_calls=ldm.unet_calls - calls0)
