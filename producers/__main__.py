"""``python -m producers <hydra overrides>`` (console script ``edsam-produce``): one producer rank.

Reads the shared config tree (``configs/config.yaml``): ``data``, ``diffusion``,
``stream``, ``producer`` (``producer.rank`` / ``producer.num_producers`` are set by
``scripts/launch.sh``) and ``logging``, and runs :class:`edsam_online.producer.Producer`.
Exits 0 after SIGINT/SIGTERM or after ``producer.num_samples`` samples; a bad config
value or a missing path exits 2 naming the key, before the generator loads.
"""

from __future__ import annotations

import sys

from edsam_online.cli import CONFIG_DIR, prepare_argv

USAGE = """One producer rank: invert real images, transport and sample them, stream them to the trainers.
  python -m producers experiment=cpu_demo producer.rank=0 stream.endpoints=[tcp://127.0.0.1:5555]
scripts/launch.sh starts the producers and the trainers together."""


def main() -> None:
    prepare_argv("edsam-produce", USAGE)
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from edsam_online.config import load_config_or_exit
    from edsam_online.preflight import preflight

    preflight(sys.argv[1:])

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def run(dictcfg: DictConfig) -> None:
        import logging

        from edsam_online.diffusion import build_sampler
        from edsam_online.diffusion.scoring import build_scorer
        from edsam_online.producer import Producer

        cfg = load_config_or_exit(dictcfg)
        logging.getLogger(__name__).info("producer %d/%d (%s)", cfg.producer.rank, cfg.producer.num_producers,
                                         cfg.diffusion.model)  # the sink says where its samples go
        producer = Producer(cfg.stream, cfg.producer, cfg.data, build_sampler(cfg.diffusion),
                            resolution=cfg.diffusion.resolution, logging_cfg=cfg.logging, run_dir=cfg.run_dir,
                            resolved=OmegaConf.to_container(dictcfg, resolve=True),
                            scorer=build_scorer(cfg.producer.scorer, cfg.diffusion, cfg.producer.scorer_model,
                                                cfg.producer.scorer_pretrained))
        producer.run()

    run()


if __name__ == "__main__":
    main()
