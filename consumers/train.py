"""Trainer rank entry point: ``torchrun --nproc-per-node N -m consumers.train <hydra overrides>``.

Also ``edsam-train`` (console script) and a single process without torchrun
(``python -m consumers.train``). Builds :class:`edsam_online.trainer.Trainer` from the
config tree and runs it. Exit codes: 0 when training ended (its last step, ``stop_at``,
or a SIGTERM/SIGINT that left a checkpoint), 2 for a bad config value or a missing path
(the message names the key; checked before anything starts), 1 for any other failure.
"""

from __future__ import annotations

import sys

from edsam_online.cli import CONFIG_DIR, prepare_argv

USAGE = """One trainer rank: Eq. 11 CLIP training on real data plus the extra batch its method makes.
  torchrun --nproc-per-node 2 -m consumers.train experiment=cpu_demo trainer.steps=50
scripts/launch.sh starts the producers and the trainers together."""


def main() -> None:
    prepare_argv("edsam-train", USAGE)
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from edsam_online.config import load_config_or_exit
    from edsam_online.preflight import preflight

    preflight(sys.argv[1:])

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
    def run(dictcfg: DictConfig) -> None:
        import traceback

        from edsam_online.runtime import end_rank
        from edsam_online.trainer import Trainer

        cfg = load_config_or_exit(dictcfg)
        code = 0
        try:
            Trainer(cfg, OmegaConf.to_container(dictcfg, resolve=True)).train()
        except BaseException:  # noqa: BLE001 - reported, then the rank ends with code 1
            traceback.print_exc()
            code = 1
        end_rank(code)

    run()


if __name__ == "__main__":
    main()
