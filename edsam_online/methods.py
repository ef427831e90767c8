"""What fills the second term of Eq. 11: the method a run compares (Hydra group ``method``).

Every method trains on the same real batch (``trainer.batch_size``) with the same loss;
those with an extra batch give it the same size (``mix.extra_share``) and its own
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
``ada``       Volpi et al. (2018): real images moved by gradient ascent on     augment
              the current CLIP loss, with a feature-distance penalty
``advstyle``  Zhong et al. (2022): real images restyled by per-channel mean    augment
              and std moved by gradient ascent on the current CLIP loss
============  ===============================================================  =========

A method with a producer decides the generator's ``diffusion.mode``
(:data:`GENERATOR_MODES`; ``load_config`` sets it, and refuses a mode set by hand that
disagrees). A method that makes its
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
from edsam_online.validation import require_at_least

#: Method name -> the generator's ``diffusion.mode`` (None: the method runs no producer).
GENERATOR_MODES: dict[str, str | None] = {
    "none": None,
    "real2x": None,
    "edsam": "transport",
    "random": "random",
    "identity": "identity",
    "masking": None,
    "ada": None,
    "advstyle": None,
}
#: Methods whose extra batch an :class:`Augmentation` makes from the step's real batch.
AUGMENTING = ("masking", "ada", "advstyle")


@dataclass
class MethodConfig:
    """Which method fills Eq. 11's second term (the module docstring lists them).

    ``masking``: ``mask_ratio`` of each image is masked, in square blocks of ``mask_block``
    pixels; a ViT's blocks are its patches whatever ``mask_block`` says. ``ada`` and
    ``advstyle``: ``adv_steps`` signed-gradient ascent steps of size ``adv_lr`` (in
    normalised pixel units for ``ada``, in normalised mean/std units for ``advstyle``);
    ``ada_gamma`` weighs ADA's penalty on the squared distance of the perturbed images'
    embeddings from the originals'. ``offline_shards`` (a generating method only): read
    the extra batch from shards a producer wrote with ``producer.sink=shards`` (a brace
    pattern, list or folder of ``*.tar``), the paper's generate-then-train pipeline, instead
    of the online stream; the run then needs no producer.
    """

    name: str = "edsam"
    offline_shards: str = ""
    mask_ratio: float = 0.5
    mask_block: int = 4
    adv_steps: int = 2
    adv_lr: float = 0.05
    ada_gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in GENERATOR_MODES:
            raise ValueError(f"name must be one of {tuple(GENERATOR_MODES)}, got {self.name!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.offline_shards and GENERATOR_MODES[self.name] is None:
            raise ValueError(f"offline_shards: method {self.name} generates nothing to read from shards")
        require_at_least(self, 1, "mask_block", "adv_steps")
        require_at_least(self, 0, "adv_lr", "ada_gamma")

    @property
    def generator_mode(self) -> str | None:
        """The ``diffusion.mode`` its producers generate with (None: it needs no producer)."""
        return GENERATOR_MODES[self.name]

    @property
    def extra_batch(self) -> str:
        """Where the second term's pairs come from: ``"none"``, ``"real"``, ``"stream"`` (the
        producers), ``"shards"`` (``offline_shards``) or ``"augment"`` (the step's hook)."""
        if self.name == "none":
            return "none"
        if self.name in AUGMENTING:
            return "augment"
        if self.generator_mode is None:
            return "real"
        return "shards" if self.offline_shards else "stream"


class Augmentation:
    """What a method does to a step's batch before the step runs. The base class keeps the
    batch as the loader made it (ED-SAM's synthetic slot, filled from the replay buffer;
    ``real2x``'s second real stream).

    A subclass may return the batch with its real part transformed, or with its slot
    (``extra_images``, ``extra_texts``, ``extra_keys``, ``extra_genuine``, ``extra_alpha``, ``extra_score``
    and the provenance lists ``extra_captions``, ``extra_producers``, ``extra_inserted_steps``, ``extra_origins``)
    supplied by the method; rows flagged ``extra_genuine`` count in the second term. It
    runs on every rank, inside ``Trainer.train_step``, with the trainer at hand (its
    model, loss, device and ``extra_batch``), and must give the slot ``trainer.extra_batch``
    rows on every rank, since each loss term gathers its batch across ranks.
    """

    def __call__(self, batch: MixedBatch, trainer: Any) -> MixedBatch:
        return batch


class BlockMasking(Augmentation):
    """``masking``: the extra batch is the step's first ``extra_batch`` real images with
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
        images = batch.real_images[:trainer.extra_batch]
        return _fill_slot(batch, images.masked_fill(self.mask(len(images), images.shape[-2], images.shape[-1]), 0.0))


def _fill_slot(batch: MixedBatch, images: torch.Tensor) -> MixedBatch:
    """The slot becomes ``images``, made from the first rows of the real batch (their captions)."""
    n = images.shape[0]
    batch.extra_images = images
    batch.extra_texts = batch.real_texts[:n]
    batch.extra_keys = list(batch.real_keys[:n])
    batch.extra_genuine = torch.ones(n, dtype=torch.bool)
    batch.extra_alpha = torch.full((n,), float("nan"))
    batch.extra_score = None
    batch.extra_captions = list(batch.real_captions[:n])
    batch.extra_producers = [None] * n
    batch.extra_inserted_steps = [None] * n
    batch.extra_origins = [None] * n
    return batch


class _GradientAscent(Augmentation):
    """Shared by ADA and AdvStyle: ``steps`` signed-gradient ascent steps on the current
    model's contrastive loss of a batch (this rank's rows only: no collective, and the
    parameters' gradients are left untouched). The model runs in eval mode meanwhile, so
    the ascent's forwards do not move BatchNorm statistics. Written by hand: neither
    open_clip nor torch ships these domain-generalisation baselines."""

    def __init__(self, steps: int, lr: float):
        from open_clip.loss import ClipLoss

        self.steps, self.lr = steps, lr
        self.loss = ClipLoss()

    def objective(self, model: nn.Module, images: torch.Tensor, text_features: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
        image_features = model.encode_image(images, normalize=True)
        return self.loss(image_features, text_features, scale)

    def ascend(self, model: nn.Module, texts: torch.Tensor, device: torch.device, make: Any,
               params: list[torch.Tensor], penalty: Any = None) -> torch.Tensor:
        """Move ``params`` up the loss of ``make(*params)`` (the images); returns the last images."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                text_features = model.encode_text(texts.to(device), normalize=True)
                scale = model.logit_scale.exp()
            for _ in range(self.steps):
                for p in params:
                    p.requires_grad_(True)
                x = make(*params)
                objective = self.objective(model, x, text_features, scale)
                if penalty is not None:
                    objective = objective - penalty(model, x)
                grads = torch.autograd.grad(objective, params)
                with torch.no_grad():
                    params = [(p + self.lr * g.sign()).detach() for p, g in zip(params, grads)]
            with torch.no_grad():
                return make(*params).detach()
        finally:
            model.train(was_training)


class ADA(_GradientAscent):
    """``ada`` (Volpi et al., 2018): the extra batch is the step's first ``extra_batch`` real
    images after ``steps`` ascent steps on ``L_clip(x', c) - gamma * ||f(x') - f(x)||^2``,
    ``f`` the normalised image embedding: images the current model finds hard that keep
    their meaning."""

    def __init__(self, steps: int, lr: float, gamma: float):
        super().__init__(steps, lr)
        self.gamma = gamma

    def __call__(self, batch: MixedBatch, trainer: Any) -> MixedBatch:
        model, device = trainer.model, trainer.device
        n = trainer.extra_batch
        images = batch.real_images[:n].to(device)
        with torch.no_grad():
            reference = model.encode_image(images, normalize=True)

        def penalty(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return self.gamma * (m.encode_image(x, normalize=True) - reference).pow(2).sum(dim=1).mean()

        moved = self.ascend(model, batch.real_texts[:n], device, lambda x: x, [images.clone()], penalty)
        return _fill_slot(batch, moved.cpu())


class AdvStyle(_GradientAscent):
    """``advstyle`` (Zhong et al., 2022): the extra batch is the step's first ``extra_batch``
    real images re-styled: each image's per-channel mean and std become learnable,
    start at their own values and take ``steps`` ascent steps on the contrastive loss;
    the normalised image content is kept."""

    def __call__(self, batch: MixedBatch, trainer: Any) -> MixedBatch:
        model, device = trainer.model, trainer.device
        n = trainer.extra_batch
        images = batch.real_images[:n].to(device)
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True) + 1e-5
        content = (images - mean) / std
        moved = self.ascend(model, batch.real_texts[:n], device, lambda mu, sigma: content * sigma + mu,
                            [mean.clone(), std.clone()])
        return _fill_slot(batch, moved.cpu())


def build_augmentation(cfg: MethodConfig, model: nn.Module, seed: int = 0) -> Augmentation:
    """The hook of ``cfg``'s method for a trainer of ``model`` (an open_clip CLIP)."""
    if cfg.name == "masking":
        patch = getattr(model.visual, "patch_size", None)  # open_clip's VisionTransformer
        block = (patch[0] if isinstance(patch, tuple) else patch) if patch is not None else cfg.mask_block
        return BlockMasking(cfg.mask_ratio, int(block), seed)
    if cfg.name == "ada":
        return ADA(cfg.adv_steps, cfg.adv_lr, cfg.ada_gamma)
    if cfg.name == "advstyle":
        return AdvStyle(cfg.adv_steps, cfg.adv_lr)
    return Augmentation()
