"""ED-SAM's training objective (Eq. 11) on top of open_clip's contrastive losses.

``L = L_clip(x_s, c) + w * L_clip(x_t, c)``: each term is a symmetric InfoNCE
(or SigLIP) over its own batch, gathered across ranks. Under DDP the terms use
``ClipLoss(gather_with_grad=True, local_loss=True)``: each rank scores its own
rows against the gathered global batch, so the mean of the per-rank losses is
the single-process loss on the global batch and DDP's gradient averaging gives
its gradient (docs/design.md, 'Known pitfalls'). SigLIP uses ``SigLipLoss(dist_impl="gather")``.

A step whose global synthetic slot holds no synthetic sample trains on the real
term alone (``use_syn=False``); the caller decides that collectively (every
rank must agree, since the synthetic term's all_gather is a collective).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

LOSS_KINDS = ("clip", "siglip")


def build_contrastive_loss(kind: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """One open_clip contrastive loss term set up for this rank."""
    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size, dist_impl="gather")
    raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


class EDSAMLoss(nn.Module):
    """Eq. 11: a real term plus a ``syn_weight``-weighted synthetic term.

    Two separate loss modules, because each term is contrastive within its own
    batch: synthetic captions must not serve as negatives for real images (and
    vice versa), as in the paper.
    """

    def __init__(self, kind: str = "clip", syn_weight: float = 1.0, rank: int = 0, world_size: int = 1):
        super().__init__()
        if syn_weight < 0:
            raise ValueError(f"syn_weight must be >= 0, got {syn_weight}")
        self.kind = kind
        self.syn_weight = syn_weight
        self.real_term = build_contrastive_loss(kind, rank, world_size)
        self.syn_term = build_contrastive_loss(kind, rank, world_size)

    def _term(self, loss: nn.Module, img: torch.Tensor, txt: torch.Tensor, scale, bias) -> torch.Tensor:
        if self.kind == "siglip" and bias is None:
            raise ValueError("siglip loss needs a model with a logit_bias (model.init_logit_bias)")
        return loss(img, txt, scale, bias)

    def forward(
        self,
        real_image_features: torch.Tensor,
        real_text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        syn_image_features: torch.Tensor | None = None,
        syn_text_features: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        use_syn: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``loss_real`` and ``loss_syn`` (zero when the step has no synthetic term)."""
        loss_real = self._term(self.real_term, real_image_features, real_text_features, logit_scale, logit_bias)
        if use_syn and syn_image_features is not None and syn_image_features.shape[0] > 0:
            loss_syn = self._term(self.syn_term, syn_image_features, syn_text_features, logit_scale, logit_bias)
            loss = loss_real + self.syn_weight * loss_syn
        else:
            loss_syn = torch.zeros_like(loss_real)
            loss = loss_real
        return {"loss": loss, "loss_real": loss_real, "loss_syn": loss_syn}
