"""Trainer rank entry point: ``torchrun --nproc-per-node N -m consumers.train <hydra overrides>``.

Also ``edsam-train`` (console script) and a single process without torchrun
(``python -m consumers.train``). Builds :class:`edsam_online.trainer.Trainer` from the
config tree and runs it. Exit codes: 0 when training ended (its last step, ``stop_at``,
or a SIGTERM/SIGINT that left a checkpoint), 2 for a bad config value (the message names
the key), 1 for any other failure.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from edsam_online.config import load_config_or_exit
from edsam_online.runtime import end_rank
from edsam_online.trainer import Trainer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(dictcfg: DictConfig) -> None:
    cfg = load_config_or_exit(dictcfg)
    code = 0
    try:
        Trainer(cfg, OmegaConf.to_container(dictcfg, resolve=True)).train()
    except BaseException:  # noqa: BLE001 - reported, then the rank ends with code 1
        traceback.print_exc()
        code = 1
    end_rank(code)


if __name__ == "__main__":
    main()
