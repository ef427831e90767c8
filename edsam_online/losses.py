"""ED-SAM's training objective (Eq. 11) on top of open_clip's contrastive losses.

``L = L_clip(x_s, c) + w * L_clip(x_t, c)``: each term is a symmetric InfoNCE
(or SigLIP) over its own batch, gathered across ranks. Under DDP the terms use
``ClipLoss(gather_with_grad=True, local_loss=True)``: each rank scores its own
rows against the gathered global batch, so the mean of the per-rank losses is
the single-process loss on the global batch and DDP's gradient averaging gives
its gradient (docs/design.md, 'Known pitfalls'). SigLIP uses ``SigLipLoss(dist_impl="gather")``.

A step whose global extra batch holds no genuine extra pair (every place a starved
slot's fallback) trains on the real term alone (``use_extra=False``); the caller decides
that collectively (every rank must agree, since the extra term's all_gather is a collective).

``extra_weights`` (InfoNCE only) weights each extra row's loss, e.g. by its fidelity
score: ``L_extra = sum_i w_i l_i / sum_i w_i`` over the global batch, where ``l_i`` is row
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
EXTRA_WEIGHTINGS = ("none", "score")


@dataclass
class LossConfig:
    """Eq. 11's loss (Hydra key ``loss``): ``kind`` of each contrastive term, ``clip``
    (InfoNCE) or ``siglip``; ``extra_weight`` is ``w`` in ``L = L_real + w * L_extra``;
    ``extra_weighting="score"`` weights each row of the second term by the fidelity score its
    producer sent (``producer.scorer``; rows without a score, such as a starved slot's real
    fallback, weigh 1), ``"none"`` weighs every row alike."""

    kind: str = "clip"
    extra_weight: float = 1.0
    extra_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        require_at_least(self, 0, "extra_weight")
        if self.extra_weighting not in EXTRA_WEIGHTINGS:
            raise ValueError(f"extra_weighting must be one of {EXTRA_WEIGHTINGS}, got {self.extra_weighting!r}")
        if self.extra_weighting == "score" and self.kind != "clip":
            raise ValueError("extra_weighting: score needs kind=clip (SigLIP's open_clip loss has no per-row weights)")


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
    """Eq. 11: a real term plus an ``extra_weight``-weighted term over the extra batch.

    Two separate loss modules, because each term is contrastive within its own
    batch: synthetic captions must not serve as negatives for real images (and
    vice versa), as in the paper.
    """

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.kind = cfg.kind
        self.extra_weight = cfg.extra_weight
        self.world_size = world_size
        self.real_term = build_contrastive_loss(cfg.kind, rank, world_size)
        self.extra_term = build_contrastive_loss(cfg.kind, rank, world_size)

    def _term(self, loss: nn.Module, img: torch.Tensor, txt: torch.Tensor, scale, bias) -> torch.Tensor:
        if self.kind == "siglip" and bias is None:
            raise ValueError("siglip loss needs a model with a logit_bias (model.init_logit_bias)")
        return loss(img, txt, scale, bias)

    def forward(
        self,
        real_image_features: torch.Tensor,
        real_text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        extra_image_features: torch.Tensor | None = None,
        extra_text_features: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        use_extra: bool = True,
        extra_weights: torch.Tensor | None = None,
        row_losses: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``loss_real`` and ``loss_extra`` (zero when the step has no extra
        term). ``extra_weights``: one weight >= 0 per extra row (see the module docstring).
        ``row_losses`` (clip only) adds ``extra_row_loss``: each of this rank's extra rows' own
        InfoNCE loss, detached, from the logits the term computes anyway (what a trainer
        reports to the producers, :mod:`edsam_online.feedback`)."""
        loss_real = self._term(self.real_term, real_image_features, real_text_features, logit_scale, logit_bias)
        out = {"loss_real": loss_real}
        if use_extra and extra_image_features is not None and extra_image_features.shape[0] > 0:
            if extra_weights is not None or row_losses:
                per_row = self._extra_rows(extra_image_features, extra_text_features, logit_scale)
                loss_extra = per_row.mean() if extra_weights is None else self._weighted(per_row, extra_weights)
                if row_losses:
                    out["extra_row_loss"] = per_row.detach()
            else:
                loss_extra = self._term(self.extra_term, extra_image_features, extra_text_features, logit_scale,
                                        logit_bias)
            loss = loss_real + self.extra_weight * loss_extra
        else:
            loss_extra = torch.zeros_like(loss_real)
            loss = loss_real
        return {"loss": loss, **out, "loss_extra": loss_extra}

    def _extra_rows(self, image_f: torch.Tensor, text_f: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Each local extra row's InfoNCE loss against the global batch: the mean of its
        image-to-text and text-to-image cross-entropies (open_clip's ``ClipLoss`` averages the
        same values over the rows)."""
        if self.kind != "clip":
            raise ValueError("per-row extra losses (extra_weights, row_losses) need the clip loss")
        logits_image, logits_text = self.extra_term.get_logits(image_f, text_f, logit_scale)
        labels = self.extra_term.get_ground_truth(image_f.device, logits_image.shape[0])
        return (F.cross_entropy(logits_image, labels, reduction="none")
                + F.cross_entropy(logits_text, labels, reduction="none")) / 2

    def _weighted(self, per_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The extra term with per-row weights. Each rank returns its rows' share, normalised
        by the global mean weight, so the mean over ranks (DDP's gradient average) is the
        weighted mean over the global batch."""
        if weights.shape != per_row.shape or not bool((weights >= 0).all()):
            raise ValueError(f"extra_weights must be {per_row.shape[0]} values >= 0")
        weights = weights.to(per_row)
        total = torch.stack([weights.sum(), weights.new_tensor(float(len(weights)))])
        if self.world_size > 1:
            dist.all_reduce(total)
        return (per_row * weights).mean() / (total[0] / total[1]).clamp_min(1e-12)
