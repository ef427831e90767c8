"""The ED-SAM transport transformation (arXiv 2406.01432, Eq. 9 and Proposition 1).

Given an inverted latent ``z_s`` (approximately ``N(0, I)`` after DDIM inversion),
``transport`` returns a latent ``z_t`` whose distribution is ``N(alpha, I)`` for a
scalar ``alpha`` drawn per sample, i.e. a latent at squared 2-Wasserstein distance
``d * alpha**2`` from the source distribution, while keeping a ``1/sqrt(2)`` share of
the source latent (so the sample stays tied to its real image and caption).

Modes
-----
``"transport"``  Eq. 9: ``alpha ~ U(-rho, rho)`` per sample, ``eps ~ N(alpha*sqrt(2), I)``,
                 ``z_t = (z_s + eps) / sqrt(2)``.
``"random"``     Table 3 ablation: ``z_t ~ N(rho, I)``, independent of ``z_s``; alpha = rho.
``"identity"``   No transport: ``z_t = z_s`` and alpha = 0 (the inversion is resampled as-is,
                 a plain invert-then-regenerate baseline).
"""

from __future__ import annotations

import math

import torch

MODES = ("transport", "random", "identity")


def transport(
    z_s: torch.Tensor,
    rho: float,
    mode: str = "transport",
    generator: torch.Generator | None = None,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transport a batch of latents ``z_s`` ([B, ...]); returns ``(z_t, alpha)`` with ``alpha`` [B].

    Noise is drawn in float32 on ``z_s``'s device from ``generator`` (pass a seeded
    ``torch.Generator`` on the same device for reproducible output). ``alpha`` ([B], in
    ``[-rho, rho]``; ``"transport"`` only) replaces Eq. 9's uniform draw with chosen shifts
    (:mod:`edsam_online.policy`); the fresh noise is drawn as before.
    """
    if not isinstance(z_s, torch.Tensor) or z_s.ndim < 2:
        raise ValueError(f"z_s must be a tensor [B, ...] with a batch dimension, got {getattr(z_s, 'shape', type(z_s))}")
    if not torch.is_floating_point(z_s):
        raise ValueError(f"z_s must be floating point, got {z_s.dtype}")
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if alpha is not None and mode != "transport":
        raise ValueError(f"alpha can be chosen only in mode 'transport', got mode {mode!r}")

    b = z_s.shape[0]
    shape_b = (b,) + (1,) * (z_s.ndim - 1)
    z = z_s.float()
    if mode == "identity":
        return z_s.clone(), torch.zeros(b, device=z_s.device)
    if mode == "random":
        alpha = torch.full((b,), rho, device=z_s.device)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        return (noise + rho).to(z_s.dtype), alpha
    # Eq. 9
    if alpha is None:
        u = torch.rand((b,), generator=generator, device=z.device, dtype=torch.float32)
        alpha = (2.0 * u - 1.0) * rho
    else:
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=z.device).reshape(-1)
        if alpha.shape[0] != b or not bool(((alpha.abs() <= rho) & alpha.isfinite()).all()):
            raise ValueError(f"alpha must hold {b} finite values in [-rho, rho] = [-{rho}, {rho}]")
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
    eps = eps + alpha.view(shape_b) * math.sqrt(2.0)
    z_t = (z + eps) / math.sqrt(2.0)
    return z_t.to(z_s.dtype), alpha


def w2_squared_to_standard(z: torch.Tensor) -> torch.Tensor:
    """Per-sample squared 2-Wasserstein distance between ``N(m, v I)`` fitted to each sample and ``N(0, I)``.

    Closed form for isotropic Gaussians in ``d`` dimensions:
    ``W2^2 = d * m^2 + d * (sqrt(v) - 1)^2``; under Proposition 1 this is ``d * alpha^2``.
    """
    flat = z.flatten(1).double()
    d = flat.shape[1]
    m = flat.mean(1)
    v = flat.var(1, unbiased=True)
    return d * m**2 + d * (v.sqrt() - 1.0) ** 2
