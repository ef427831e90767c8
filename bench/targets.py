"""The performance targets, checked against the JSON files ``bench/run_all.sh`` writes.

``python bench/targets.py DIR`` prints one markdown table (row, target, measured, PASS / MISS /
reported / unmeasured) and, under it, the profile that explains each MISS. Exit status 0 when
no row is MISS. Each row names the file it reads; a missing file makes the row ``unmeasured``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    name: str
    target: str
    files: tuple[str, ...]
    check: Callable[[list[dict]], tuple[str, bool | None, str]]  # -> (measured, passed or None, profile)


def _online_offline(data: list[dict]) -> tuple[str, bool, str]:
    (d,) = data
    runs = d["runs"]
    profile = "; ".join(
        f"{arm}: wall {statistics.median(r['wall_s'] for r in rs):.0f} s = startup "
        f"{statistics.median(r['startup_s'] for r in rs):.0f} + "
        + (f"generate {statistics.median(r['generate_s'] for r in rs):.0f} + " if arm == "offline" else "")
        + f"train steps {statistics.median(r['train_s'] for r in rs):.0f} + eval/end "
        f"{statistics.median(r['eval_end_s'] for r in rs):.0f}"
        for arm, rs in runs.items())
    step_ms = {arm: 1000 * statistics.median(r["train_s"] / r["steps"] for r in rs) for arm, rs in runs.items()}
    producer_s = d["n"] / statistics.median(r["producer_samples_per_s"] for r in runs["online"])
    profile += (f". Online's trainer takes {step_ms['online']:.0f} ms per step on its one thread "
                f"({step_ms['offline']:.0f} offline on both cores); its producer made the N = {d['n']} samples "
                f"in {producer_s:.0f} s. Offline generation ran at "
                f"{statistics.median(r['generate_samples_per_s'] for r in runs['offline']):.1f} samples/s on both cores")
    return f"{d['ratio']:.3f} (median of {len(runs['online'])})", d["ratio"] <= 0.75, profile


def _busy(data: list[dict]) -> tuple[str, bool, str]:
    (d,) = data
    ldm = d["ldm"]
    busy = ldm["pipelined"]["generator_busy_frac"]
    measured = f"{busy:.3f} (sequential loop {ldm['sequential']['generator_busy_frac']:.3f})"
    if "standin" in d:
        s = d["standin"]
        measured += (f"; GPU-speed stand-in {s['pipelined']['generator_busy_frac']:.3f} "
                     f"(sequential {s['sequential']['generator_busy_frac']:.3f})")
    return measured, busy >= 0.95, f"generate {ldm['pipelined']['generate_ms_per_sample']:.0f} ms per sample"


def _vs_pipeline(data: list[dict]) -> tuple[str, bool, str]:
    (d,) = data
    r = d["ratio_sampler_over_pipeline"]
    return (f"{r:.3f}x ({d['images']} images x M = {d['m']}, {d['steps']} steps, {d['resolution']} px)", r >= 1.0,
            f"median s: sampler {d['median_s']['sampler']:.1f}, pipeline {d['median_s']['pipeline']:.1f}")


def _split(data: list[dict]) -> tuple[str, None, str]:
    (d,) = data
    c = d["composed"]["batch 2"]
    shares = ", ".join(f"{k} {v:.1%}" for k, v in c["shares"].items())
    return f"{c['total_s']:.1f} s per sample on {d['device']} {d['dtype']} ({shares})", None, ""


def _projection(data: list[dict]) -> tuple[str, None, str]:
    (d,) = data
    row = next(r for r in d["rows"] if r["samples_per_insert"] == d["config_spi"])
    p = row["projection"]
    return (f"spi {row['samples_per_insert']:g}: online {p['online_s'] / 3600:.2f} h; offline {p['offline_dedicated_s'] / 3600:.2f} h "
            f"on the same dedicated GPUs ({p['online_s'] / p['offline_dedicated_s']:.2f}), "
            f"{p['offline_pooled_s'] / 3600:.2f} h with every GPU in each phase ({p['online_s'] / p['offline_pooled_s']:.2f}); "
            f"rates {d['sources'][0]} / {d['sources'][1]}", None, "")


def _rss(data: list[dict]) -> tuple[str, bool, str]:
    growth = [d["summary"]["growth"] for d in data]
    g = statistics.median(growth)
    return (f"{g:+.2%} (median of {len(data)}: " + ", ".join(f"{x:+.2%}" for x in growth) + ")", g <= 0.05,
            "RSS MiB start/end/max: " + "; ".join(
                f"{d['summary']['rss_start_mib']:.0f}/{d['summary']['rss_end_mib']:.0f}/{d['summary']['rss_max_mib']:.0f}"
                for d in data))


def _buffer_bytes(data: list[dict]) -> tuple[str, bool, str]:
    ratios = [d["summary"]["buffer_bytes_vs_capacity_items"] for d in data]
    r = max(ratios)
    return f"{r:.3f} x capacity x item bytes (max of {len(data)})", r <= 1.2, ""


def _gpu_check(data: list[dict]) -> tuple[str, bool, str]:
    (rows,) = data
    failed = [r["step"] for r in rows if r["status"] != "PASS"]
    return (f"{len(rows) - len(failed)} of {len(rows)} steps pass", not failed,
            "failed: " + ", ".join(f"{r['step']} {r['status']}" for r in rows if r["status"] != "PASS"))


def _gpu_sampler(data: list[dict]) -> tuple[str, None, str]:
    (rows,) = data
    sampler = next(r for r in rows if r["step"] == "sampler")
    return sampler["result"].get("summary", sampler["status"]), None, ""


ROWS = (
    Row("online / offline wall-clock (2 cores, offline phases on both)", "<= 0.75", ("online_offline.json",),
        _online_offline),
    Row("producer/generator_busy_frac, 256 px JPEG, CPU", ">= 0.95", ("producer.json",), _busy),
    Row("ED-SAM sampler / LDMTextToImagePipeline, CPU", ">= 1.0x", ("vs_pipeline.json",), _vs_pipeline),
    Row("paper-setting per-sample cost split, CPU", "(reported)", ("components.json",), _split),
    Row("online / offline projected to dedicated GPUs (paper_cc3m)", "(reported)", ("sizing.json",), _projection),
    Row("trainer RSS growth over 10 min after the buffer is full", "<= 5%",
        ("memory_1.json", "memory_2.json", "memory_3.json"), _rss),
    Row("buffer bytes", "<= 1.2 x capacity x item bytes", ("memory_1.json", "memory_2.json", "memory_3.json"),
        _buffer_bytes),
    Row("bench/gpu_check.sh --device cpu --tiny", "every step passes", ("gpu_check_tiny/gpu_check.json",), _gpu_check),
    Row("bench/gpu_check.sh on a GPU", "every step passes", ("gpu_check_gpu/gpu_check.json",), _gpu_check),
    Row("paper-scale sampler on a GPU (fp32 / bf16 / channels_last / compile)", "(reported)",
        ("gpu_check_gpu/gpu_check.json",), _gpu_sampler),
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python bench/targets.py DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    lines = ["| row | target | measured | result |", "|---|---|---|---|"]
    profiles, missed = [], 0
    for row in ROWS:
        paths = [folder / f for f in row.files]
        present = [p for p in paths if p.exists()]
        if not present:
            lines.append(f"| {row.name} | {row.target} | - | unmeasured (no {row.files[0]}) |")
            continue
        measured, passed, profile = row.check([json.loads(p.read_text()) for p in present])
        result = "reported" if passed is None else ("PASS" if passed else "MISS")
        missed += result == "MISS"
        lines.append(f"| {row.name} | {row.target} | {measured} | {result} |")
        if result == "MISS":
            profiles.append(f"- **{row.name}** missed: {profile}")
    print("\n".join(lines + ([""] + profiles if profiles else [])))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
