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

``syn_weights`` (InfoNCE only) weights each synthetic row's loss, e.g. by its fidelity
score: ``L_syn = sum_i w_i l_i / sum_i w_i`` over the global batch, where ``l_i`` is row
i's mean of its image-to-text and text-to-image cross-entropies. open_clip's losses only
average, hence the per-row term here; it reuses ``ClipLoss.get_logits`` and its labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from edsam_online.validation import require_at_least

LOSS_KINDS = ("clip", "siglip")
SYN_WEIGHTINGS = ("none", "score")


@dataclass
class LossConfig:
    """Eq. 11's loss (Hydra key ``loss``): ``kind`` of each contrastive term, ``clip``
    (InfoNCE) or ``siglip``; ``syn_weight`` is ``w`` in ``L = L_real + w * L_syn``;
    ``syn_weighting="score"`` weights each row of the second term by the fidelity score its
    producer sent (``producer.scorer``; rows without a score, such as a starved slot's real
    fallback, weigh 1), ``"none"`` weighs every row alike."""

    kind: str = "clip"
    syn_weight: float = 1.0
    syn_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        require_at_least(self, 0, "syn_weight")
        if self.syn_weighting not in SYN_WEIGHTINGS:
            raise ValueError(f"syn_weighting must be one of {SYN_WEIGHTINGS}, got {self.syn_weighting!r}")
        if self.syn_weighting == "score" and self.kind != "clip":
            raise ValueError("syn_weighting: score needs kind=clip (SigLIP's open_clip loss has no per-row weights)")


def build_contrastive_loss(kind: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """One open_clip contrastive loss term set up for this rank (open_clip is imported here, not
    at module level, so that reading a trainer config does not load it)."""
    from open_clip.loss import ClipLoss, SigLipLoss

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

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.kind = cfg.kind
        self.syn_weight = cfg.syn_weight
        self.world_size = world_size
        self.real_term = build_contrastive_loss(cfg.kind, rank, world_size)
        self.syn_term = build_contrastive_loss(cfg.kind, rank, world_size)

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
        syn_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``loss_real`` and ``loss_syn`` (zero when the step has no synthetic
        term). ``syn_weights``: one weight >= 0 per synthetic row (see the module docstring)."""
        loss_real = self._term(self.real_term, real_image_features, real_text_features, logit_scale, logit_bias)
        if use_syn and syn_image_features is not None and syn_image_features.shape[0] > 0:
            if syn_weights is not None:
                loss_syn = self._weighted_syn_term(syn_image_features, syn_text_features, logit_scale, syn_weights)
            else:
                loss_syn = self._term(self.syn_term, syn_image_features, syn_text_features, logit_scale, logit_bias)
            loss = loss_real + self.syn_weight * loss_syn
        else:
            loss_syn = torch.zeros_like(loss_real)
            loss = loss_real
        return {"loss": loss, "loss_real": loss_real, "loss_syn": loss_syn}

    def _weighted_syn_term(self, image_f: torch.Tensor, text_f: torch.Tensor, logit_scale: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
        """The synthetic InfoNCE term with per-row weights. Each rank returns its rows' share,
        normalised by the global mean weight, so the mean over ranks (DDP's gradient average)
        is the weighted mean over the global batch."""
        if self.kind != "clip":
            raise ValueError("syn_weights need the clip loss")
        if weights.shape != (image_f.shape[0],) or not bool((weights >= 0).all()):
            raise ValueError(f"syn_weights must be {image_f.shape[0]} values >= 0")
        logits_image, logits_text = self.syn_term.get_logits(image_f, text_f, logit_scale)
        labels = self.syn_term.get_ground_truth(image_f.device, logits_image.shape[0])
        per_row = (F.cross_entropy(logits_image, labels, reduction="none")
                   + F.cross_entropy(logits_text, labels, reduction="none")) / 2
        weights = weights.to(per_row)
        total = torch.stack([weights.sum(), weights.new_tensor(float(len(weights)))])
        if self.world_size > 1:
            dist.all_reduce(total)
        return (per_row * weights).mean() / (total[0] / total[1]).clamp_min(1e-12)
