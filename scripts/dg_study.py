#!/usr/bin/env python
"""The domain-generalisation study: methods x seeds at equal steps, images per step and model.

    python scripts/dg_study.py                         # every method, 3 seeds (5 for none, real2x, edsam)
    python scripts/dg_study.py --quick                 # one seed of none, real2x, edsam (a smoke check)
    python scripts/dg_study.py --tables-only           # the tables of the runs finished so far
    python scripts/dg_study.py --sweep diffusion.rho=0.2,0.5,1.0 --methods edsam   # Table 1 in kind
    python scripts/dg_study.py --tables-only --against producer.policy=uniform     # also pair with that sweep
    python scripts/dg_study.py --imagefolder pacs_sketch=/data/pacs/sketch trainer.steps=300

Each run is ``scripts/launch.sh --run-dir <out>/runs/<sweep>/<method>/seed<S> experiment=cpu_demo
method=<method> seed=S data.seed=S producer.seed=S eval.samples_per_class=<n> <overrides>``:
the same experiment for every method, so the same steps, model, real batch and images per
step. Evaluation uses ``--eval-per-class`` images per class (1000 per domain by default: the
sampling error of a domain's accuracy stays near 1.6 points). A run whose ``result.json``
exists is skipped, so an interrupted study continues where it stopped. Each result records
the final zero-shot and linear-probe top-1 per set, the wall time, the trainer's mean step
time and the producer's samples/s.

Writes ``<out>/table.md`` (mean ± std over seeds per method, per set, target mean and target
group means (generator-seen, generator-unseen), for zero-shot and linear probe; and each
method's per-seed difference to ``none`` and ``real2x`` on the source, the target mean and each
group mean, with the sign of every seed's difference), ``<out>/table.csv`` and
``<out>/bars.png``, over every finished run in ``<out>``.
Trailing arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "real2x", "edsam", "random", "identity", "masking", "ada", "advstyle")
CORE = ("none", "real2x", "edsam")  # the comparison that matters gets more seeds
PREFIXES = {"zero-shot": "eval/zeroshot_top1/", "linear probe": "eval/linear_probe/"}
COSTS = {"trainer s/step": "step_time_s", "run wall (s)": "wall_s", "producer samples/s": "producer_samples_per_s",
         "samples generated": "generated", "samples drawn": "drawn", "feedback applied": "feedback_applied",
         "feedback dropped": "feedback_dropped", "mean abs alpha sent": "alpha_abs_sent"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument("--core-seeds", type=int, default=5, help=f"seeds for {', '.join(CORE)}")
    p.add_argument("--eval-per-class", type=int, default=100, help="evaluation images per class and domain")
    p.add_argument("--imagefolder", action="append", default=[], metavar="NAME=PATH",
                   help="an extra ImageFolder evaluation set (repeatable)")
    p.add_argument("--sweep", default="", metavar="KEY=V1,V2", help="one override swept over values")
    p.add_argument("--against", default="", metavar="KEY=V",
                   help="also pair every sweep's runs with the same method's runs of this sweep")
    p.add_argument("--out", default=str(ROOT / "results" / "dg_study"))
    p.add_argument("--launcher", default=str(ROOT / "scripts" / "launch.sh"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="one seed of none, real2x and edsam")
    p.add_argument("--tables-only", action="store_true", help="write the tables from the finished runs, start none")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides
    args.methods = list(CORE) if args.quick else [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}, choose from {list(METHODS)}")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, list[str]]]:
    """(sweep label, method, seed, overrides) of every run, in order."""
    sweep: list[tuple[str, list[str]]] = [("base", [])]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        sweep = [(f"{key}={v}", [f"{key}={v}"]) for v in values.split(",") if v]
    seeds = {m: 1 if args.quick else (args.core_seeds if m in CORE else args.seeds) for m in args.methods}
    # Seed-major order: an interrupted study has every method at the same number of seeds.
    return [(label, method, seed, extra)
            for label, extra in sweep
            for seed in range(max(seeds.values(), default=0))
            for method in args.methods if seed < seeds[method]]


def final_record(metrics_file: Path) -> dict[str, float]:
    """The last values of every key in a trainer's JSONL (evaluation and training)."""
    last: dict[str, float] = {}
    step_times = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if "train/step_time_s" in record:
            step_times.append(record["train/step_time_s"])
    last["train/step_time_s_mean"] = statistics.fmean(step_times) if step_times else float("nan")
    return last


def run_folder(out: Path, label: str = "*", method: str = "*", seed: int | str = "*") -> Path:
    """A run's folder in the study (with the defaults: the glob of every run's folder). A sweep
    label's ``=`` becomes ``_`` in the folder name: launch.sh passes the folder to Hydra as
    ``run_dir=...``, whose override grammar refuses a second unquoted ``=``."""
    return out / "runs" / label.replace("=", "_") / method / f"seed{seed}"


def run_one(args: argparse.Namespace, label: str, method: str, seed: int, extra: list[str]) -> dict:
    run_dir = run_folder(Path(args.out), label, method, seed)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    folders = [f"+eval.imagefolders.{spec.partition('=')[0]}={spec.partition('=')[2]}" for spec in args.imagefolder]
    cmd = ["bash", args.launcher, "--run-dir", str(run_dir), "experiment=cpu_demo", f"method={method}",
           f"seed={seed}", f"data.seed={seed}", f"producer.seed={seed}",
           f"eval.samples_per_class={args.eval_per_class}", *folders, *extra, *args.overrides]
    print(f"[dg_study] {label} {method} seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    record = final_record(run_dir / "metrics" / "trainer0.jsonl")
    result = {
        "sweep": label, "method": method, "seed": seed, "wall_s": time.monotonic() - start,
        "step_time_s": record["train/step_time_s_mean"],
        "producer_samples_per_s": record.get("producer/samples_per_s", 0.0),
        "metrics": {k: v for k, v in record.items() if k.startswith(tuple(PREFIXES.values()))},
        **producer_summary(run_dir),
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (sweep, method, measure, set): mean and std over seeds, in %."""
    rows = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["sweep"], r["method"]), []).append(r)
    for (label, method), runs in groups.items():
        for measure, prefix in PREFIXES.items():
            names = sorted({k[len(prefix):] for r in runs for k in r["metrics"] if k.startswith(prefix)})
            for name in names:
                values = [100 * r["metrics"][prefix + name] for r in runs if prefix + name in r["metrics"]]
                mean, std = _mean_std(values)
                rows.append({"sweep": label, "method": method, "measure": measure, "set": name,
                             "mean": mean, "std": std, "seeds": len(values)})
        for measure, key in COSTS.items():
            values = [r[key] for r in runs if math.isfinite(r[key])]  # counts unknown for early results
            if values:
                mean, std = _mean_std(values)
                rows.append({"sweep": label, "method": method, "measure": measure, "set": "-",
                             "mean": mean, "std": std, "seeds": len(values)})
    return rows


def write_outputs(rows: list[dict], diffs: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["sweep", "method", "measure", "set", "mean", "std", "seeds"])
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for label in dict.fromkeys(r["sweep"] for r in rows):
        for measure in PREFIXES:
            sel = [r for r in rows if r["sweep"] == label and r["measure"] == measure]
            if not sel:
                continue
            sets = sorted(dict.fromkeys(r["set"] for r in sel if r["set"] != "source"), key=_set_order)
            methods = list(dict.fromkeys(r["method"] for r in sel))
            cell = {(r["method"], r["set"]): f"{r['mean']:.1f} ± {r['std']:.1f} (n={r['seeds']})" for r in sel}
            lines += [f"### {measure} top-1 (%), {label}", "", "| method | " + " | ".join(sets) + " |",
                      "|---|" + "---:|" * len(sets)]
            lines += ["| " + m + " | " + " | ".join(cell.get((m, s), "-") for s in sets) + " |" for m in methods]
            lines.append("")
        sel = [r for r in rows if r["sweep"] == label and r["measure"] in COSTS]
        cell = {(r["method"], r["measure"]): f"{r['mean']:.3g} ± {r['std']:.2g}" for r in sel}
        lines += [f"### cost, {label}", "", "| method | " + " | ".join(COSTS) + " |", "|---|" + "---:|" * len(COSTS)]
        lines += ["| " + m + " | " + " | ".join(cell.get((m, c), "-") for c in COSTS) + " |"
                  for m in dict.fromkeys(r["method"] for r in sel)]
        lines.append("")
    for summary in dict.fromkeys(d["set"] for d in diffs):
        lines += [f"### {summary}, method − control, paired by seed (points; signs per seed)", "",
                  "| method | control | zero-shot | linear probe |", "|---|---|---:|---:|"]
        cell = {(d["sweep"], d["method"], d["control"], d["measure"]):
                f"{d['mean']:+.1f} ± {d['std']:.1f} ({d['wins']}/{d['seeds']} > 0: {d['signs']})"
                for d in diffs if d["set"] == summary}
        for label, method, control in dict.fromkeys((d["sweep"], d["method"], d["control"]) for d in diffs
                                                    if d["set"] == summary):
            name = method if label == "base" else f"{method} ({label})"
            lines.append(f"| {name} | {control} | "
                         + " | ".join(cell.get((label, method, control, m), "-") for m in PREFIXES) + " |")
        lines.append("")
    lines += _per_sample_gain(rows, diffs)
    (out / "table.md").write_text("\n".join(lines))
    _plot(rows, out / "bars.png")


def _per_sample_gain(rows: list[dict], diffs: list[dict]) -> list[str]:
    """Accuracy per generated sample: each generating method's mean target-mean gain over
    ``none`` (paired by seed) divided by the mean number of samples its runs generated, per
    1000 samples."""
    generated = {(r["sweep"], r["method"]): r["mean"] for r in rows
                 if r["measure"] == "samples generated" and math.isfinite(r["mean"])}
    gain = {(d["sweep"], d["method"], d["measure"]): d["mean"] for d in diffs
            if d["set"] == "target_mean" and d["control"] == "none"}
    keys = [k for k, n in generated.items() if n > 0 and any(k + (m,) in gain for m in PREFIXES)]
    if not keys:
        return []
    lines = ["### target-mean gain over none per 1000 generated samples (points)", "",
             "| method | samples generated | zero-shot | linear probe |", "|---|---:|---:|---:|"]
    for label, method in keys:
        name = method if label == "base" else f"{method} ({label})"
        cells = [f"{1000 * gain[(label, method, m)] / generated[(label, method)]:+.3f}"
                 if (label, method, m) in gain else "-" for m in PREFIXES]
        lines.append(f"| {name} | {generated[(label, method)]:.0f} | " + " | ".join(cells) + " |")
    return lines + [""]


def _set_order(name: str) -> tuple[int, str]:
    """Columns: the source domain, the other sets by name, the target mean, then the group
    means ("source" itself is left out: it repeats the source domain's column)."""
    from edsam_online.data import SOURCE_DOMAIN

    rank = 0 if name == SOURCE_DOMAIN else 2 if name == "target_mean" else 3 if name.endswith("_mean") else 1
    return (rank, name)


def summary_sets(results: list[dict]) -> list[str]:
    """The sets the paired differences are reported on: the source, the target mean and
    every target group's mean that the runs logged."""
    logged = {k[len(prefix):] for r in results for k in r["metrics"] for prefix in PREFIXES.values()
              if k.startswith(prefix)}
    groups = sorted(n for n in logged if n.endswith("_mean") and n != "target_mean")
    return [n for n in ("source", "target_mean", *groups) if n in logged]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["set"] == "target_mean"]
    labels = list(dict.fromkeys(f"{r['method']}\n{r['sweep']}" if r["sweep"] != "base" else r["method"]
                                for r in sel))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.4
    for i, measure in enumerate(PREFIXES):
        values = {(f"{r['method']}\n{r['sweep']}" if r["sweep"] != "base" else r["method"]): r
                  for r in sel if r["measure"] == measure}
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        ax.bar(xs, [values[k]["mean"] if k in values else 0 for k in labels], width,
               yerr=[values[k]["std"] if k in values else 0 for k in labels], capsize=3, label=measure)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("target-mean top-1 (%), mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _alpha_abs_sent(records: list[dict], rho: float) -> float:
    """Mean |alpha| of the samples a steered producer sent: its alpha histogram over time
    (:func:`edsam_online.report.alpha_histogram`), weighted by the samples sent between
    records, at the bins' centres."""
    from edsam_online.policy import bin_edges
    from edsam_online.report import alpha_histogram

    sent, grid = alpha_histogram(records)
    edges = bin_edges(rho, len(grid))
    counts = np.asarray(grid) * np.diff([0.0, *sent])  # [bins, records]
    return float((counts.sum(1) * np.abs((edges[:-1] + edges[1:]) / 2)).sum() / counts.sum())


def producer_summary(run_dir: Path) -> dict[str, float]:
    """From a run's metrics, the numbers that are known (JSON has no NaN): ``generated``, the
    samples its producers sent (their own last records); ``drawn``, the generated samples its
    trainer trained on, reuse included (0 for a method without a producer; left out where its
    log lacks the count); for ``producer.policy=adversarial``, ``feedback_applied`` and
    ``feedback_dropped`` (summed over producers) and ``alpha_abs_sent`` (mean |alpha| of the
    samples sent; Eq. 9's uniform draw gives rho / 2)."""
    import yaml

    config = run_dir / "hydra" / "config.yaml"
    rho = float((yaml.safe_load(config.read_text()) or {}).get("diffusion", {}).get("rho", 0.0)) \
        if config.is_file() else 0.0
    generated, applied, dropped, alphas = 0.0, [], [], []
    for log in sorted(run_dir.glob("metrics/producer*.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(records) if "producer/sent" in r), {})
        generated += last.get("producer/sent", 0.0)
        if "feedback/applied" in last:
            applied.append(last["feedback/applied"])
            dropped.append(sum(v for k, v in last.items() if k.startswith("feedback/dropped/")))
            alphas.append(_alpha_abs_sent(records, rho))
    trainer = run_dir / "metrics" / "trainer0.jsonl"
    # NaN where the trainer's log predates the metric (or is gone): unknown, not none
    drawn = final_record(trainer).get("train/extra_samples", math.nan) if trainer.is_file() else math.nan
    drawn = drawn if generated else 0.0
    out = {"generated": generated, "drawn": drawn}
    if applied:
        out.update(feedback_applied=sum(applied), feedback_dropped=sum(dropped), alpha_abs_sent=statistics.fmean(alphas))
    return {k: v for k, v in out.items() if math.isfinite(v)}


SUMMARY_KEYS = ("generated", "drawn", "feedback_applied", "feedback_dropped", "alpha_abs_sent")


def finished_results(out: Path) -> list[dict]:
    """Every finished run in the study folder, this invocation's and earlier ones' (a later
    sweep adds its rows to the table instead of replacing it), in plan order. A result written
    before runs recorded their :func:`producer_summary` gets it from its run folder where the
    metrics are still there (and keeps it); a number no result holds is unknown (NaN)."""
    results = []
    for f in sorted(out.glob(str(run_folder(Path()) / "result.json"))):
        result = json.loads(f.read_text())
        if "generated" not in result and (f.parent / "metrics" / "trainer0.jsonl").is_file():
            result.update(producer_summary(f.parent))
            f.write_text(json.dumps(result, indent=1))
        results.append({**dict.fromkeys(SUMMARY_KEYS, math.nan), **result})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(results, key=lambda r: (r["sweep"] != "base", r["sweep"], order[r["method"]], r["seed"]))


def paired_differences(results: list[dict], controls: tuple[str, ...] = ("none", "real2x"),
                       against: str = "") -> list[dict]:
    """Per-seed differences of top-1 on each of :func:`summary_sets` against each control of
    the base study (and, for a sweep's runs, against the same method's base runs: what the
    swept setting changed; with ``against``, also against the same method's runs in that
    sweep, e.g. a control run in the same session), in points, with each seed's sign (``+``,
    ``-``, ``0``). Runs of one seed share the data seed, so the pairing removes the
    between-seed variance that both methods share."""
    by_run = {(r["sweep"], r["method"], r["seed"]): r["metrics"] for r in results}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["sweep"], r["method"]), []).append(r)
    rows = []
    for (label, method), runs in groups.items():
        own = (method,) if label != "base" and method not in controls else ()
        pairings = [(c, "base", c) for c in controls + own]
        if against and label not in ("base", against):
            pairings.append((f"{method} ({against})", against, method))
        for control, control_sweep, control_method in pairings:
            if label == "base" and method in controls and controls.index(method) <= controls.index(control):
                continue  # a control against itself, or against a later control (the reverse row is there)
            for summary in summary_sets(results):
                for measure, prefix in PREFIXES.items():
                    key = prefix + summary
                    pairs = [(r["metrics"], by_run.get((control_sweep, control_method, r["seed"]), {})) for r in runs]
                    diffs = [100 * (m[key] - c[key]) for m, c in pairs if key in m and key in c]
                    if diffs:
                        mean, std = _mean_std(diffs)
                        signs = "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs)
                        rows.append({"sweep": label, "method": method, "control": control, "set": summary,
                                     "measure": measure, "mean": mean, "std": std, "seeds": len(diffs),
                                     "wins": sum(d > 0 for d in diffs), "signs": signs})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for run in [] if args.tables_only else plan(args):
        run_one(args, *run)
    results = finished_results(Path(args.out))
    write_outputs(aggregate(results), paired_differences(results, against=args.against), Path(args.out))
    print((Path(args.out) / "table.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
