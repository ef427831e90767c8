"""``python -m producers <hydra overrides>`` (console script ``edsam-produce``): one producer rank.

Reads the shared config tree (``configs/config.yaml``): ``data``, ``diffusion``,
``stream``, ``producer`` (``producer.rank`` / ``producer.num_producers`` are set by
``scripts/launch.sh``) and ``logging``, and runs :class:`edsam_online.producer.Producer`.
Exits 0 after SIGINT/SIGTERM or after ``producer.num_samples`` samples; a bad config
value exits 2 naming the key.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from edsam_online.config import load_config_or_exit  # also registers the typed schema "edsam_config"

_CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(config_path=_CONFIGS, config_name="config", version_base=None)
def main(dictcfg: DictConfig) -> None:
    from edsam_online.diffusion import build_sampler
    from edsam_online.diffusion.scoring import build_scorer
    from edsam_online.producer import Producer

    cfg = load_config_or_exit(dictcfg)
    logging.getLogger(__name__).info(
        "producer %d/%d (%s) -> %s", cfg.producer.rank, cfg.producer.num_producers, cfg.diffusion.model,
        cfg.stream.endpoints,
    )
    producer = Producer(cfg.stream, cfg.producer, cfg.data, build_sampler(cfg.diffusion),
                        resolution=cfg.diffusion.resolution, logging_cfg=cfg.logging, run_dir=cfg.run_dir,
                        resolved=OmegaConf.to_container(dictcfg, resolve=True),
                        scorer=build_scorer(cfg.producer.scorer, cfg.diffusion, cfg.producer.scorer_model,
                                            cfg.producer.scorer_pretrained))
    producer.run()


if __name__ == "__main__":
    main()
