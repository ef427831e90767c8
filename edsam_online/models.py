"""CLIP models through open_clip.

Any open_clip model name works (``ViT-B-16``, ``RN50``, ``hf-hub:...``,
``local-dir:...``). The tiny CPU presets in ``edsam_online/model_configs/``
(``edsam-tiny``: a 3-layer ViT at 32 px; ``edsam-tiny-rn``: a small ModifiedResNet)
are registered through open_clip's own ``add_model_config``, so they go through
exactly the code path a ViT-B-16 does.

open_clip (and the transformers it loads) is imported only to build a model: a config is
checked against the model names on disk (:func:`model_names`), so reading it stays light.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_SCHEMAS = ("hf-hub:", "local-dir:")
_registered = False


def register_tiny_models() -> None:
    """Add the project's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def model_names() -> set[str]:
    """What ``open_clip.list_models()`` lists once :func:`register_tiny_models` ran: the names
    of the model config files of open_clip and of this project, found without importing
    open_clip (``find_spec`` locates a package without running it)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in spec.submodule_search_locations] + [MODEL_CONFIG_DIR]
    return {f.stem for folder in folders for f in folder.glob("*.json")}


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
        if not self.name.startswith(_SCHEMAS) and self.name not in model_names():
            raise ValueError(
                f"name: unknown open_clip model {self.name!r}; "
                f"see open_clip.list_models() (e.g. edsam-tiny, ViT-B-16, RN50)"
            )
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


def create_clip(cfg: ClipModelConfig, device: str = "cpu"):
    """Build ``(model, preprocess_train, preprocess_val, tokenizer)`` with open_clip."""
    import open_clip

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


def write_stand_in(name: str, folder: str | Path, width: int = 64, layers: int = 2) -> str:
    """A ``local-dir:`` open_clip folder holding ``name``'s architecture with every width and
    depth cut down (image size, patch size, context length and vocabulary kept), for random
    weights: a preset's model runs on a CPU in seconds, through the path a user's own folder
    takes. Returns the ``model.name`` that loads it. open_clip has no such option: it builds a
    named model at its full size."""
    import json

    import open_clip

    register_tiny_models()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"name: unknown open_clip model {name!r}")
    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    vision["layers"] = [1] * len(vision["layers"]) if isinstance(vision["layers"], (list, tuple)) else layers
    vision["width"] = width if isinstance(vision["layers"], int) else max(8, width // 4)
    if isinstance(vision["layers"], int):
        vision["head_width"] = width // 2
    text.update(width=width, heads=2, layers=layers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stand_in = {"model_cfg": {**cfg, "embed_dim": width // 2, "vision_cfg": vision, "text_cfg": text},
                "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(stand_in, indent=1))
    return f"local-dir:{folder}"

