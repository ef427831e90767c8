"""``python -m producers.prepare <hydra overrides>`` (``edsam-prepare``): get the generator ready before ranks start.

With ``diffusion.model=retrained`` (the default on machines without downloaded
weights) this loads the shipped small LDM, or, for a recipe or resolution that does not
ship, trains it on the built-in world corpus once and caches it, so that
``scripts/launch.sh`` does not start trainers against producers that are still
training. Any other model is only loaded once, which turns a missing
folder or an offline hub id into an error before any rank starts. The fidelity filter's
scorer (``producer.scorer``) is built the same way: the attribute measurers are fitted and
cached here, a CLIP scorer's weights loaded once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from edsam_online.config import load_config_or_exit

_CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
log = logging.getLogger(__name__)


@hydra.main(config_path=_CONFIGS, config_name="config", version_base=None)
def main(dictcfg: DictConfig) -> None:
    from edsam_online.diffusion.registry import load_sampler_ldm
    from edsam_online.diffusion.scoring import build_scorer

    cfg = load_config_or_exit(dictcfg)
    start = time.monotonic()
    ldm = load_sampler_ldm(cfg.diffusion)
    log.info("generator %s ready in %.0f s", ldm.model_id, time.monotonic() - start)
    if cfg.producer.scorer != "none":
        start = time.monotonic()
        build_scorer(cfg.producer.scorer, cfg.diffusion, cfg.producer.scorer_model, cfg.producer.scorer_pretrained)
        log.info("scorer %s ready in %.0f s", cfg.producer.scorer, time.monotonic() - start)


if __name__ == "__main__":
    main()
