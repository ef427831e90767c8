"""``python -m producers.prepare <hydra overrides>`` (``edsam-prepare``): get the generator ready before ranks start.

With ``diffusion.model=retrained`` (the default on machines without downloaded
weights) this loads the shipped small LDM, or, for a recipe or resolution that does not
ship, trains it on the built-in world corpus once and caches it, so that
``scripts/launch.sh`` does not start trainers against producers that are still
training. Any other model is only loaded once, which turns a missing
folder or an offline hub id into an error before any rank starts. The fidelity filter's
scorer (``producer.scorer``) is built the same way: the attribute measurers are fitted and
cached here, a CLIP scorer's weights loaded once. The config is checked first, as every
entry point does (:mod:`edsam_online.preflight`).
"""

from __future__ import annotations

import sys

from edsam_online.cli import CONFIG_DIR, prepare_argv

USAGE = """Load (or, for a new recipe, train and cache) the generator and the fidelity scorer once.
  python -m producers.prepare experiment=cpu_demo"""


def main() -> None:
    prepare_argv("edsam-prepare", USAGE)
    import hydra
    from omegaconf import DictConfig

    from edsam_online.config import load_config_or_exit
    from edsam_online.preflight import preflight

    preflight(sys.argv[1:])

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def run(dictcfg: DictConfig) -> None:
        import logging
        import time

        from edsam_online.diffusion.registry import load_sampler_ldm
        from edsam_online.diffusion.scoring import build_scorer

        log = logging.getLogger(__name__)
        cfg = load_config_or_exit(dictcfg)
        start = time.monotonic()
        ldm = load_sampler_ldm(cfg.diffusion)
        log.info("generator %s ready in %.0f s", ldm.model_id, time.monotonic() - start)
        if cfg.producer.scorer != "none":
            start = time.monotonic()
            build_scorer(cfg.producer.scorer, cfg.diffusion, cfg.producer.scorer_model, cfg.producer.scorer_pretrained)
            log.info("scorer %s ready in %.0f s", cfg.producer.scorer, time.monotonic() - start)

    run()


if __name__ == "__main__":
    main()
