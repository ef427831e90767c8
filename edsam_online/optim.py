"""Optimizer, learning-rate schedule, gradient clipping and logit-scale clamp.

The recipe is open_clip's (``open_clip_train``): AdamW without weight decay on
gains, biases, norms and the logit scale; linear warm-up then cosine decay;
the logit scale clamped to ``[0, ln(max)]`` after every step. open_clip's
training package is not a library dependency, so these few lines live here,
built on ``torch.optim`` and ``LambdaLR`` (whose state dict checkpoints).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from edsam_online.config import TrainerConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, cfg: "TrainerConfig") -> torch.optim.AdamW:
    """AdamW with two parameter groups (decay / no decay), as open_clip trains CLIP."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the base lr at ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainerConfig") -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over ``cfg.steps`` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
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
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model.logit_scale.clamp_(0, math.log(max_scale))
