"""What fills the second term of Eq. 11: the method a run compares (Hydra group ``method``).

Every method trains on the same real batch (``trainer.batch_size``) with the same loss;
those with an extra batch give it the same size (``mix.syn_share``) and its own
contrastive term, so methods are compared at the same images per step:

============  ===============================================================  =========
``none``      real pairs only, one term                                        no extra
``real2x``    a second, disjoint stream of real pairs: the compute-matched     real
              control (as many images per step as ED-SAM, none generated)
``edsam``     ED-SAM's transport samples (Eq. 9) from the replay buffer        producer
``random``    the paper's Table 3 ablation, ``z_t ~ N(rho, I)``                producer
``identity``  alpha = 0: a reconstruction through the same LDM, which          producer
              separates the generator's own artefacts from the shift
``masking``   FLIP-style masking: masked copies of the step's real images      augment
============  ===============================================================  =========

A method with a producer sets the generator's ``diffusion.mode``; the config check
refuses a run whose ``diffusion.mode`` disagrees with its method. A method that makes its
extra batch from the step's own real batch does it in an :class:`Augmentation`, the
trainer's hook (see :func:`build_augmentation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edsam_online.loader import MixedBatch

#: Method name -> the generator's ``diffusion.mode`` (None: the method runs no producer).
GENERATOR_MODES: dict[str, str | None] = {
    "none": None,
    "real2x": None,
    "edsam": "transport",
    "random": "random",
    "identity": "identity",
    "masking": None,
}
#: Methods whose extra batch an :class:`Augmentation` makes from the step's real batch.
AUGMENTING = ("masking",)


@dataclass
class MethodConfig:
    """Which method fills Eq. 11's second term (the module docstring lists them).

    ``masking``: ``mask_ratio`` of each image is masked, in square blocks of ``mask_block``
    pixels; a ViT's blocks are its patches whatever ``mask_block`` says.
    """

    name: str = "edsam"
    mask_ratio: float = 0.5
    mask_block: int = 4

    def __post_init__(self) -> None:
        if self.name not in GENERATOR_MODES:
            raise ValueError(f"name must be one of {tuple(GENERATOR_MODES)}, got {self.name!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_block < 1:
            raise ValueError(f"mask_block must be >= 1, got {self.mask_block}")

    @property
    def generator_mode(self) -> str | None:
        """The ``diffusion.mode`` its producers generate with (None: it needs no producer)."""
        return GENERATOR_MODES[self.name]

    @property
    def extra_batch(self) -> str:
        """Where the second term's pairs come from: ``"none"``, ``"real"`` or ``"stream"``."""
        if self.name == "none":
            return "none"
        if self.name in AUGMENTING:
            return "augment"
        return "stream" if self.generator_mode is not None else "real"


class Augmentation:
    """What a method does to a step's batch before the step runs. The base class keeps the
    batch as the loader made it (ED-SAM's synthetic slot, filled from the replay buffer;
    ``real2x``'s second real stream).

    A subclass may return the batch with its real part transformed, or with its slot
    (``syn_images``, ``syn_texts``, ``syn_keys``, ``syn_is_synthetic``, ``syn_alpha``)
    supplied by the method; rows flagged ``syn_is_synthetic`` count in the second term. It
    runs on every rank, inside ``Trainer.train_step``, with the trainer at hand (its
    model, loss, device and ``syn_batch``), and must give the slot ``trainer.syn_batch``
    rows on every rank, since each loss term gathers its batch across ranks.
    """

    def __call__(self, batch: MixedBatch, trainer: Any) -> MixedBatch:
        return batch


class BlockMasking(Augmentation):
    """``masking``: the extra batch is the step's first ``syn_batch`` real images with
    ``ratio`` of their ``block`` x ``block`` blocks set to zero (the normalised mean),
    exactly that many blocks per image, chosen at random; captions are theirs.

    FLIP drops masked patches from a ViT's token sequence, which also saves their compute.
    Here a ViT's blocks are its patches, so the model sees the same information FLIP's
    does, but the masked tokens still run: dropping tokens for the extra rows alone would
    need a second forward pass, which DDP's one forward per backward does not allow.
    Written by hand because open_clip's ``PatchDropout`` applies to every row of a forward.
    """

    def __init__(self, ratio: float, block: int, seed: int = 0):
        self.ratio, self.block = ratio, block
        self.generator = torch.Generator().manual_seed(seed)

    def mask(self, n: int, height: int, width: int) -> torch.Tensor:
        """bool ``[n, 1, height, width]``: True where a pixel is masked."""
        rows, cols = math.ceil(height / self.block), math.ceil(width / self.block)
        k = round(self.ratio * rows * cols)
        order = torch.rand(n, rows * cols, generator=self.generator).argsort(dim=1)
        blocks = torch.zeros(n, rows * cols, dtype=torch.bool)
        blocks.scatter_(1, order[:, :k], True)
        grid = blocks.view(n, 1, rows, cols)
        return grid.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)[:, :, :height, :width]

    def __call__(self, batch: MixedBatch, trainer: Any) -> MixedBatch:
        n = trainer.syn_batch
        images = batch.real_images[:n]
        batch.syn_images = images.masked_fill(self.mask(n, images.shape[-2], images.shape[-1]), 0.0)
        batch.syn_texts = batch.real_texts[:n]
        batch.syn_keys = list(batch.real_keys[:n])
        batch.syn_is_synthetic = torch.ones(n, dtype=torch.bool)
        batch.syn_alpha = torch.full((n,), float("nan"))
        return batch


def build_augmentation(cfg: MethodConfig, model: nn.Module, seed: int = 0) -> Augmentation:
    """The hook of ``cfg``'s method for a trainer of ``model`` (an open_clip CLIP)."""
    if cfg.name == "masking":
        patch = getattr(model.visual, "patch_size", None)  # open_clip's VisionTransformer
        block = (patch[0] if isinstance(patch, tuple) else patch) if patch is not None else cfg.mask_block
        return BlockMasking(cfg.mask_ratio, int(block), seed)
    return Augmentation()
