#!/usr/bin/env python
"""Write CurveZMQ key pairs for the producer -> trainer stream.

    python scripts/gen_curve_keys.py KEY_DIR --producers 2          # producer-0, producer-1
    python scripts/gen_curve_keys.py KEY_DIR --names gpu-a gpu-b     # chosen names

Layout (see edsam_online/security.py): KEY_DIR/receiver.key[_secret] (trainers),
KEY_DIR/producers/<name>.key_secret (one per producer host), KEY_DIR/allowed/*.key
(the receivers' allow-list). The receiver pair is kept if it exists, so the
command can add producers later. Then run with e.g.
  stream.curve=true stream.curve_server_public=KEY_DIR/receiver.key
  stream.curve_server_secret=KEY_DIR/receiver.key_secret stream.curve_allow_dir=KEY_DIR/allowed
  stream.curve_client_secret=KEY_DIR/producers/producer-0.key_secret   (per producer)
"""

from __future__ import annotations

import argparse
import sys

from edsam_online.security import generate_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("key_dir")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--producers", type=int, default=1, help="number of producers (names producer-<i>)")
    group.add_argument("--names", nargs="+", help="producer names")
    parser.add_argument("--no-allow", action="store_true", help="do not add the new producers to allowed/")
    args = parser.parse_args(argv)
    if args.names is None and args.producers < 1:
        parser.error("--producers must be >= 1")
    names = args.names or [f"producer-{i}" for i in range(args.producers)]
    paths = generate_keys(args.key_dir, names, allow=not args.no_allow)
    for role, path in paths.items():
        print(f"{role:>24}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
