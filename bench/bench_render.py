#!/usr/bin/env python
"""Rendering the built-in shapes data against what a trainer draws from it.

The built-in source is rendered on the fly (``edsam_online.data.render_sample``), in the
trainer's loader threads and the producer's data graph. This times ``--count`` renders of the
source domain per resolution on one thread, in ``--rounds`` rounds (the median is reported),
and divides the renders per second by ``--trainer-rate``: the real samples per second a
trainer takes at that resolution (default: the real-only edsam-tiny trainer at 32 px of
BENCHMARKS.md, 'Trainer'). A ratio well above 1 means one loader thread renders faster than
training consumes, so rendering never starves a step.

    python bench/bench_render.py
    python bench/bench_render.py --resolutions 32 64 --rounds 7 --json render.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from edsam_online.data import SOURCE_DOMAIN, render_sample

TRAINER_RATE = 159.6  # BENCHMARKS.md, 'Trainer': real-only edsam-tiny at 32 px, samples/s


def renders_per_s(count: int, resolution: int, seed: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        render_sample(i, SOURCE_DOMAIN, resolution, seed=seed)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="renders per round and resolution")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32])
    parser.add_argument("--trainer-rate", type=float, default=TRAINER_RATE,
                        help="real samples per second a trainer takes (the ratio's denominator)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    renders_per_s(50, args.resolutions[0], seed=1)  # warm-up: imports, caches
    rows = []
    for resolution in args.resolutions:
        rates = [renders_per_s(args.count, resolution, seed=r) for r in range(args.rounds)]
        rate = statistics.median(rates)
        rows.append({"resolution": resolution, "renders_per_s": rate, "ms_per_render": 1000 / rate,
                     "ratio_to_trainer": rate / args.trainer_rate, "rounds": rates})
    print(f"| resolution | renders/s (median of {args.rounds}) | ms per render | "
          f"renders/s / trainer samples/s ({args.trainer_rate:g}) |\n|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['resolution']} | {row['renders_per_s']:.0f} | {row['ms_per_render']:.2f} | "
              f"{row['ratio_to_trainer']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trainer_rate": args.trainer_rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
