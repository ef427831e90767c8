"""``python -m producers.plan <hydra overrides>``: does this run need producers?

Prints ``yes`` when the configured method streams its extra batch from producers
(``edsam``, ``random``, ``identity``, unless ``method.offline_shards`` is set) and ``no``
otherwise, so that
``scripts/launch.sh`` starts producers only for methods that use them. A bad config
value exits 2 naming the key, as every entry point does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from edsam_online.config import load_config_or_exit

_CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


def main(argv: list[str] | None = None) -> None:
    with initialize_config_dir(config_dir=_CONFIGS, version_base=None):
        cfg = load_config_or_exit(compose("config", overrides=list(sys.argv[1:] if argv is None else argv)))
    print("yes" if cfg.method.extra_batch == "stream" else "no")


if __name__ == "__main__":
    main()
