"""Which generator a ``SamplerConfig.model`` names, where the retrained one is cached, and loading it.

``model`` is a folder or hub id (SD or CompVis LDM layout), ``tiny-random`` (a random
tiny LDM built in memory, for tests), ``random:<hub id>`` (a published architecture with
random weights, :mod:`edsam_online.diffusion.architectures`) or ``retrained`` (the small
LDM trained on the built-in world corpus by :mod:`edsam_online.diffusion.train_ldm`). The
32 px model of the current recipe ships with the package under :data:`SHIPPED_DIR`; any
other (another resolution, a changed recipe) is trained on first use into the config's
``cache_dir``.
Both folders are named by the training recipe's version
(:func:`~edsam_online.diffusion.train_ldm.recipe_version`, which hashes the data too), so a
changed recipe or corpus is trained anew, never served from an older shipped or cached model.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edsam_online.diffusion.architectures import build_random_ldm
from edsam_online.diffusion.config import RETRAINED, TINY_RANDOM, SamplerConfig, random_architecture
from edsam_online.diffusion.pipeline import LatentDiffusion, build_tiny_ldm, load_ldm
from edsam_online.diffusion.sampler import EDSAMSampler

#: Where the shipped retrained LDM lives: ``<SHIPPED_DIR>/retrained-ldm-32px-<version>/``, written by
#: ``python -m edsam_online.diffusion.train_ldm --out <that folder>`` (the recipe's defaults).
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


def default_cache_dir() -> str:
    """The cache of a config whose ``cache_dir`` is unset: ``$EDSAM_CACHE`` or ``~/.cache/edsam-online``."""
    return os.environ.get("EDSAM_CACHE") or str(Path("~/.cache/edsam-online").expanduser())


def retrained_model_id(resolution: int) -> str:
    """``retrained-ldm-<res>px-<recipe version>``: the retrained LDM's id and cache folder name."""
    # Imported here: the package would otherwise load train_ldm before
    # ``python -m edsam_online.diffusion.train_ldm`` runs it as __main__ (runpy warns).
    from edsam_online.diffusion.train_ldm import TrainLDMConfig, recipe_version

    return f"retrained-ldm-{resolution}px-{recipe_version(TrainLDMConfig(out_dir='-', resolution=resolution))}"


def retrained_model_dir(cache_dir: str | None, resolution: int) -> Path:
    """The folder ``model="retrained"`` loads (``cache_dir=None``: :func:`default_cache_dir`)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / retrained_model_id(resolution)


def ensure_retrained(cache_dir: str | None, resolution: int) -> Path:
    """Path of the retrained LDM: the shipped one if it is of this recipe and resolution, else
    the cached one, trained first if missing (one process trains; others wait)."""
    shipped = SHIPPED_DIR / retrained_model_id(resolution)
    if (shipped / "model_index.json").is_file():
        return shipped
    target = retrained_model_dir(cache_dir, resolution)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "model_index.json").is_file():
                from edsam_online.diffusion.train_ldm import TrainLDMConfig, train_ldm  # see retrained_model_id

                train_ldm(TrainLDMConfig(out_dir=str(target), resolution=resolution))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def load_sampler_ldm(cfg: SamplerConfig) -> LatentDiffusion:
    if cfg.model == TINY_RANDOM:
        return build_tiny_ldm(cfg)
    if (arch := random_architecture(cfg.model)) is not None:
        return build_random_ldm(arch, cfg)
    if cfg.model == RETRAINED:
        path = ensure_retrained(cfg.cache_dir, cfg.resolution)
        return load_ldm(path, model_id=path.name, cfg=cfg)
    return load_ldm(cfg.model, cfg=cfg)  # hub ids resolve through the ordinary Hugging Face cache


def build_sampler(cfg: SamplerConfig) -> EDSAMSampler:
    return EDSAMSampler(load_sampler_ldm(cfg), cfg)
