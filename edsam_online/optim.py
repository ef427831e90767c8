"""Optimizer, learning-rate schedule, gradient clipping and logit-scale clamp.

The recipe is open_clip's (``open_clip_train``): AdamW without weight decay on
gains, biases, norms and the logit scale; linear warm-up then cosine decay;
the logit scale clamped to ``[0, ln(max)]`` after every step. open_clip's
training package is not a library dependency, so these few lines live here,
built on ``torch.optim`` and ``LambdaLR`` (whose state dict checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edsam_online.runtime import unwrap
from edsam_online.validation import require_at_least


# torch.optim.AdamW's keyword arguments for each ``OptimConfig.implementation``.
_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@dataclass
class OptimConfig:
    """AdamW, its schedule, gradient clipping and the logit-scale clamp (Hydra key ``optim``).

    The schedule warms up linearly for ``warmup_steps``, then decays by cosine to
    ``min_lr_ratio * lr`` at ``trainer.steps``. ``grad_clip_norm = 0`` turns clipping off.

    ``implementation`` picks torch's AdamW kernel, as torchtitan's optimizer config does:
    ``fused`` (one kernel over all parameters; CPU and CUDA), ``foreach`` (multi-tensor ops) or
    ``for-loop`` (one parameter at a time: torch's own default on CPU). They apply the same
    update up to floating-point rounding; fused is the fastest on CPU, where torch would
    otherwise loop (``bench/bench_trainer.py --optimizers fused,foreach,for-loop``).
    """

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip_norm: float = 1.0
    logit_scale_max: float = 100.0
    implementation: str = "fused"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        require_at_least(self, 0, "weight_decay", "grad_clip_norm", "warmup_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require_at_least(self, 1, "logit_scale_max")
        if self.implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {sorted(_IMPLEMENTATIONS)}, got {self.implementation!r}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups (decay / no decay), as open_clip trains CLIP."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **_IMPLEMENTATIONS[cfg.implementation])


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the base lr at ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over ``total_steps`` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm when ``max_norm > 0``; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_scale: float) -> None:
    """Keep ``exp(logit_scale)`` in ``[1, max_scale]`` (CLIP paper: 100)."""
    unwrap(model).logit_scale.clamp_(0, math.log(max_scale))
