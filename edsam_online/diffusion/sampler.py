"""The ED-SAM transport sampler: invert each real image once, transport M times, sample, decode."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from edsam_online.diffusion.config import SamplerConfig
from edsam_online.diffusion.pipeline import LatentDiffusion
from edsam_online.diffusion.transport import transport

@dataclass
class GeneratedBatch:
    """Generated samples with their provenance as columns: what :meth:`EDSAMSampler.generate`
    returns and what :func:`edsam_online.wire.encode_message` sends as it is, so a sample's
    metadata never becomes a dict of its own on the way to the wire.

    Row ``r`` is ``images[r]`` (uint8 ``[K, H, W, 3]``), generated from source ``source[r]``
    (``source_keys``/``captions`` hold each source once) with transport shift ``alpha[r]``,
    noise seed ``seed[r]`` and ``sample_index[r]``, its place among its source's samples. The
    rows of one source are consecutive (``generate`` puts source ``i`` on rows
    ``i*M .. i*M+M-1``), so :meth:`rows` cuts the source table by position. ``rho`` ..
    ``guidance`` hold for every row. ``unet_calls``: UNet evaluations that generated the rows
    (0 in a slice: the cost is counted once, on the generated batch). ``score``: each row's
    fidelity score in [0, 1] once a producer's scorer has set it (:meth:`scored`), else None.
    ``source_thumbs``: a thumbnail of each source image (uint8 ``[U, S, S, 3]``, in the order of
    ``source_keys``) where the producer adds them (``producer.source_thumb_px``), else None.
    """

    images: np.ndarray
    source_keys: list[str]
    captions: list[str]
    source: np.ndarray  # int64 [K]
    alpha: np.ndarray  # float64 [K]
    seed: np.ndarray  # int64 [K]
    sample_index: np.ndarray  # int64 [K]
    rho: float
    model_id: str
    mode: str
    steps: int
    inversion_steps: int
    guidance: float
    unet_calls: int = 0
    score: np.ndarray | None = None  # float32 [K]
    source_thumbs: np.ndarray | None = None  # uint8 [U, S, S, 3]

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, first: int, last: int) -> GeneratedBatch:
        """Rows ``first:last`` with only the sources they use (images and columns are views;
        ``source`` is renumbered into the shorter table)."""
        if not 0 <= first < last <= len(self):
            raise IndexError(f"rows {first}:{last} of {len(self)}")
        lo, hi = int(self.source[first]), int(self.source[last - 1]) + 1
        return replace(self, images=self.images[first:last], source_keys=self.source_keys[lo:hi],
                       captions=self.captions[lo:hi], source=self.source[first:last] - lo,
                       alpha=self.alpha[first:last], seed=self.seed[first:last],
                       sample_index=self.sample_index[first:last], unet_calls=0,
                       score=None if self.score is None else self.score[first:last],
                       source_thumbs=None if self.source_thumbs is None else self.source_thumbs[lo:hi])

    def row_captions(self) -> list[str]:
        """Each row's caption (its source's)."""
        return [self.captions[s] for s in self.source.tolist()]

    def scored(self, score: np.ndarray) -> GeneratedBatch:
        """This batch with ``score`` (K values in [0, 1]) as its score column."""
        score = np.asarray(score, dtype=np.float32)
        if score.shape != (len(self),) or not ((score >= 0) & (score <= 1)).all():
            raise ValueError(f"score must be {len(self)} values in [0, 1], got shape {score.shape}")
        return replace(self, score=score)

    def select(self, keep: np.ndarray) -> GeneratedBatch:
        """The rows where ``keep`` (bool [K]) is True, in order, with only the sources they use
        (``source`` renumbered); ``unet_calls`` stays with the batch. ``keep`` must select a row."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),) or not keep.any():
            raise ValueError(f"keep must be {len(self)} booleans selecting at least one row")
        used, source = np.unique(self.source[keep], return_inverse=True)
        return replace(self, images=self.images[keep], source_keys=[self.source_keys[u] for u in used.tolist()],
                       captions=[self.captions[u] for u in used.tolist()], source=source.astype(np.int64),
                       alpha=self.alpha[keep], seed=self.seed[keep], sample_index=self.sample_index[keep],
                       score=None if self.score is None else self.score[keep],
                       source_thumbs=None if self.source_thumbs is None else self.source_thumbs[used])

    @classmethod
    def single(cls, image: np.ndarray, source_key: str, caption: str, *, alpha: float, seed: int, model_id: str,
               sample_index: int = 0, rho: float = SamplerConfig.rho, mode: str = SamplerConfig.mode,
               steps: int = SamplerConfig.steps, inversion_steps: int = SamplerConfig.inversion_steps,
               guidance: float = SamplerConfig.guidance) -> GeneratedBatch:
        """One sample (``image`` uint8 ``[H, W, 3]``), e.g. to build a one-sample message in a
        test or benchmark; the settings default to :class:`SamplerConfig`'s. Values keep their
        Python types (no conversion), so ``encode_message`` refuses a wrong one by name."""
        return cls(images=image[None], source_keys=[source_key], captions=[caption], source=np.zeros(1, np.int64),
                   alpha=np.asarray([alpha]), seed=np.asarray([seed]), sample_index=np.asarray([sample_index]),
                   rho=rho, model_id=model_id, mode=mode, steps=steps, inversion_steps=inversion_steps,
                   guidance=guidance)


class EDSAMSampler:
    """Batched ED-SAM generation (docs/design.md, "Method"): one inversion per real image, M
    transported samples.

    Image ``i`` of a batch generated with ``seed=s`` draws its transport noise from a generator
    seeded with ``s + i`` (recorded in the batch's ``seed`` column), so a sample can be regenerated
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

    def _embed(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states of each caption ``[B, L, D]``: every distinct caption goes
        through the encoder once (in chunks of ``batch_size``), for inversion and for all its
        M samples alike."""
        distinct = list(dict.fromkeys(captions))
        bs = self.cfg.batch_size
        emb = torch.cat([self.ldm.embed(distinct[i:i + bs]) for i in range(0, len(distinct), bs)])
        where = {c: i for i, c in enumerate(distinct)}
        return emb[torch.tensor([where[c] for c in captions], device=emb.device)]

    @torch.no_grad()
    def generate(self, images: np.ndarray, captions: list[str], keys: list[str],
                 m: int | None = None, seed: int = 0, alpha: np.ndarray | None = None) -> GeneratedBatch:
        """M transported samples of each image (rows ``i*M .. i*M+M-1`` from image ``i``).

        ``alpha`` (one per row, ``B*M``; mode ``transport``) gives each row's shift in place of
        Eq. 9's uniform draw: a steering policy's choice (:mod:`edsam_online.policy`). None
        draws as Eq. 9 does.

        The UNet sees the chunks of ``batch_size`` rows it always has (a UNet batch may round
        floats differently, so the chunking is part of what a seed reproduces). The text encoder
        embeds each distinct caption once per call, for its inversion and all its samples. For
        the tiny and shipped models a caption's embedding does not depend on the captions batched
        with it, so this gives the outputs of embedding every chunk anew bit for bit
        (tests/test_sampler.py); a paper-scale encoder on several BLAS threads can round a row's
        last bits differently by batch size (it did so between the inversion and the sampling
        chunks of that older path too). ``mode="random"`` draws ``z_t`` without looking at the
        image, so it neither encodes nor inverts.
        """
        m = self._check(images, captions, keys, m)
        cfg, ldm = self.cfg, self.ldm
        if alpha is not None and np.shape(alpha) != (len(images) * m,):
            raise ValueError(f"alpha must hold one value per sample ({len(images) * m}), got shape {np.shape(alpha)}")
        calls0 = ldm.unet_calls
        images = self._resize(images)
        bs = cfg.batch_size
        cond = self._embed(captions)
        if cfg.mode == "random":
            f = ldm.vae_scale_factor
            z_s = torch.zeros(len(images), ldm.vae.config.latent_channels, images.shape[1] // f, images.shape[2] // f,
                              device=ldm.device)
        else:  # invert each image once
            z_s = torch.cat([ldm.invert(ldm.encode(images[i:i + bs]), cond[i:i + bs], cfg.inversion_steps)
                             for i in range(0, len(images), bs)])
        z_t, alphas = [], []
        for i in range(len(images)):
            gen = torch.Generator(device=ldm.device).manual_seed(seed + i)
            chosen = None if alpha is None else torch.as_tensor(alpha[i * m:(i + 1) * m])
            zt, a = transport(z_s[i:i + 1].expand(m, *z_s.shape[1:]), cfg.rho, cfg.mode, gen, chosen)
            z_t.append(zt)
            alphas.append(a)
        z_t, alphas = torch.cat(z_t), torch.cat(alphas)
        source = torch.arange(len(images), device=cond.device).repeat_interleave(m)
        out = []
        for i in range(0, len(z_t), bs):
            out.append(ldm.decode(ldm.sample(z_t[i:i + bs], cond[source[i:i + bs]], cfg.steps, cfg.guidance)))
        b = len(images)
        return GeneratedBatch(
            images=np.concatenate(out), source_keys=[str(k) for k in keys], captions=list(captions),
            source=np.repeat(np.arange(b, dtype=np.int64), m), alpha=alphas.double().cpu().numpy(),
            seed=np.repeat(seed + np.arange(b, dtype=np.int64), m), sample_index=np.tile(np.arange(m, dtype=np.int64), b),
            rho=float(cfg.rho), model_id=ldm.model_id, mode=cfg.mode, steps=int(cfg.steps),
            inversion_steps=int(cfg.inversion_steps), guidance=float(cfg.guidance),
            unet_calls=ldm.unet_calls - calls0)
