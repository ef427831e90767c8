"""CLIP models through open_clip.

Any open_clip model name works (``ViT-B-16``, ``RN50``, ``hf-hub:...``,
``local-dir:...``). The tiny CPU presets in ``edsam_online/model_configs/``
(``edsam-tiny``: a 3-layer ViT at 32 px; ``edsam-tiny-rn``: a small ModifiedResNet)
are registered through open_clip's own ``add_model_config``, so they go through
exactly the code path a ViT-B-16 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_SCHEMAS = ("hf-hub:", "local-dir:")
_registered = False


def register_tiny_models() -> None:
    """Add the project's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass
class ClipModelConfig:
    """Which CLIP to train.

    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...) or a
    checkpoint file; tags need the weights in open_clip's cache, since nothing is
    downloaded on machines without internet. ``init_logit_scale`` /
    ``init_logit_bias`` go to open_clip's model constructor (``None``: the model
    config's own); SigLIP training needs a bias (open_clip's SigLIP models use
    scale ``ln 10`` and bias ``-10``).
    """

    name: str = "edsam-tiny"
    pretrained: str | None = None
    image_size: int | None = None
    cache_dir: str | None = None
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        register_tiny_models()
        if not self.name.startswith(_SCHEMAS) and self.name not in open_clip.list_models():
            raise ValueError(
                f"name: unknown open_clip model {self.name!r}; "
                f"see open_clip.list_models() (e.g. edsam-tiny, ViT-B-16, RN50)"
            )
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


def create_clip(cfg: ClipModelConfig, device: str = "cpu"):
    """Build ``(model, preprocess_train, preprocess_val, tokenizer)`` with open_clip."""
    register_tiny_models()
    init = {k: getattr(cfg, k) for k in ("init_logit_scale", "init_logit_bias") if getattr(cfg, k) is not None}
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.name,
            pretrained=cfg.pretrained,
            device=device,
            force_image_size=cfg.image_size,
            cache_dir=cfg.cache_dir,
            **init,
        )
    except (RuntimeError, OSError) as err:
        if cfg.pretrained:
            raise RuntimeError(
                f"model.pretrained={cfg.pretrained!r} for {cfg.name!r} could not be loaded ({err}). "
                "This machine may be offline: pass a checkpoint file path, or put the weights in "
                "open_clip's cache (model.cache_dir) first."
            ) from err
        raise
    tokenizer = open_clip.get_tokenizer(cfg.name, cache_dir=cfg.cache_dir)
    return model, preprocess_train, preprocess_val, tokenizer
