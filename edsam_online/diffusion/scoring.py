"""Fidelity scorers for the producer's online filter: one score in [0, 1] per generated sample.

A scorer is called with a batch's images (uint8 ``[K, H, W, 3]``) and each row's caption
and returns K float32 scores; the producer sends them as the header's ``score`` column and
drops samples below ``producer.min_score`` (:class:`edsam_online.producer.Producer`).

* ``attributes``: :class:`~edsam_online.diffusion.fidelity.AttributeScorer`, the share of the
  caption's class, colour and size the sample shows (a measurer fitted on renders of every
  style of the built-in world; built-in captions only);
* ``clip``: :class:`ClipScorer`, CLIP score with any open_clip model, for real captions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from edsam_online.diffusion.registry import default_cache_dir
from edsam_online.models import ClipModelConfig, create_clip

if TYPE_CHECKING:
    from edsam_online.diffusion.config import SamplerConfig

Scorer = Callable[[np.ndarray, list[str]], np.ndarray]


class ClipScorer:
    """``max(0, cos(image, caption))`` under an open_clip model (``name`` and ``pretrained``
    as in :class:`~edsam_online.models.ClipModelConfig`: a tag in open_clip's cache or a
    checkpoint file), as CLIPScore (Hessel et al. 2021) without its 2.5 rescaling, so that it
    stays in [0, 1]."""

    def __init__(self, name: str, pretrained: str | None, device: str = "cpu", batch_size: int = 64):
        self.model, _, self.preprocess, self.tokenizer = create_clip(ClipModelConfig(name, pretrained), device)
        self.model.eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        scores = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(img)) for img in images[i:i + self.batch_size]])
            image_f = self.model.encode_image(x.to(self.device), normalize=True)
            text_f = self.model.encode_text(self.tokenizer(captions[i:i + self.batch_size]).to(self.device),
                                            normalize=True)
            scores.append((image_f * text_f).sum(-1).clamp(min=0, max=1).float().cpu())
        return torch.cat(scores).numpy()


def build_scorer(kind: str, sampler: SamplerConfig, clip_model: str = "", clip_pretrained: str | None = None
                 ) -> Scorer | None:
    """The scorer ``kind`` names (None for ``none``), on the generator's device: ``attributes``
    loads the measurer that ships with the package (32 px), or trains one at another
    resolution on first use and caches it in the generator's cache folder; ``clip`` scores with the open_clip model ``clip_model`` and the
    weights ``clip_pretrained`` (:class:`ClipScorer`)."""
    if kind == "none":
        return None
    if kind == "attributes":
        from edsam_online.diffusion.fidelity import load_attribute_scorer

        return load_attribute_scorer(sampler.cache_dir or default_cache_dir(), sampler.resolution)[0]
    if kind == "clip":
        return ClipScorer(clip_model, clip_pretrained or None, sampler.device)
    raise ValueError(f"scorer must be none, attributes or clip, got {kind!r}")
