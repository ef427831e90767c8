"""scripts/dg_study.py: the run plan, resuming, and the tables, with a stand-in launcher."""

from __future__ import annotations

import csv
import json

import pytest

from _scripts import load_script

dg_study = load_script("scripts/dg_study.py")

# Writes what a trainer's metrics file would hold: accuracies that depend on method and seed.
FAKE_LAUNCH = r'''
run_dir=$2; method=${4#method=}; seed=${5#seed=}
echo "$@" >> "$(dirname "$0")/calls.log"
mkdir -p "$run_dir/metrics"
case $method in none) base=20;; *) base=30;; esac
python3 - "$run_dir" "$base" "$seed" <<'PY'
import json, sys
run, base, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
acc = (base + 2 * seed) / 100
records = [{"step": 1, "train/step_time_s": 0.5, "train/loss": 1.0},
           {"step": 2, "eval/zeroshot_top1/flat": acc + 0.3, "eval/zeroshot_top1/source": acc + 0.3,
            "eval/zeroshot_top1/target_mean": acc,
            "eval/linear_probe/target_mean": acc + 0.1, "producer/samples_per_s": 12.0,
            "eval/zeroshot_top1/generator_seen_mean": acc + seed / 100,
            "eval/linear_probe/generator_seen_mean": acc}]
if base == 30:  # a generating method: its producer's records, and the samples its trainer drew
    records[1]["train/extra_samples"] = 4000
    open(f"{run}/metrics/producer0.jsonl", "w").write('{"producer/sent": 500}\n{"producer/sent": 1000}\n')
open(f"{run}/metrics/trainer0.jsonl", "w").write("\n".join(map(json.dumps, records)))
PY
'''


def test_the_study_runs_every_method_and_seed_once_and_tabulates_mean_and_spread(tmp_path):
    launcher = tmp_path / "launch.sh"
    launcher.write_text(FAKE_LAUNCH)
    out = tmp_path / "study"
    argv = ["--methods", "none,edsam", "--seeds", "2", "--core-seeds", "3", "--out", str(out),
            "--launcher", str(launcher), "trainer.steps=10"]
    dg_study.main(argv)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 6  # none and edsam are core methods: 3 seeds each
    assert all("experiment=cpu_demo" in c and "trainer.steps=10" in c and "eval.samples_per_class=100" in c
               for c in calls)
    rows = list(csv.DictReader(open(out / "table.csv")))
    edsam = next(r for r in rows if r["method"] == "edsam" and r["measure"] == "zero-shot" and r["set"] == "target_mean")
    assert (float(edsam["mean"]), float(edsam["std"]), edsam["seeds"]) == (32.0, 2.0, "3")  # 30, 32, 34
    assert "| edsam | 62.0 ± 2.0 (n=3) | 32.0 ± 2.0 (n=3) |" in (out / "table.md").read_text()
    assert "| edsam | 0.5 ± 0 |" in (out / "table.md").read_text()  # trainer s/step, then wall and samples/s
    assert (out / "bars.png").stat().st_size > 0
    result = json.loads((out / "runs" / "base" / "none" / "seed1" / "result.json").read_text())
    assert result["step_time_s"] == 0.5 and result["producer_samples_per_s"] == 12.0

    table = (out / "table.md").read_text()
    target = table[table.index("### target_mean, method − control"):]
    assert "| edsam | none | +10.0 ± 0.0 (3/3 > 0: +++) | +10.0 ± 0.0 (3/3 > 0: +++) |" in target
    group = table[table.index("### generator_seen_mean, method − control"):]
    assert "| edsam | none | +10.0 ± 0.0 (3/3 > 0: +++) |" in group  # the group mean gets its own paired table
    assert table.index("### source, method − control") < table.index("### target_mean, method − control")
    header = next(line for line in table.splitlines() if line.startswith("| method | flat"))
    assert header.endswith("| target_mean | generator_seen_mean |")  # group means after the target mean
    assert "| edsam | 0.5 ± 0 | " in table and "| 1e+03 ± 0 | 4e+03 ± 0 |" in table  # generated, drawn
    assert "| edsam | 1000 | +10.000 | +10.000 |" in table  # 10 points over none per 1000 generated samples

    dg_study.main(argv)  # resumed: every run is finished, none is started again
    dg_study.main(["--tables-only", "--out", str(out), "--launcher", str(launcher)])
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 6

    # A later sweep adds its rows to the same table; the base study's rows stay.
    dg_study.main(["--methods", "edsam", "--core-seeds", "1", "--sweep", "buffer.distinct_sources=true",
                   "--out", str(out), "--launcher", str(launcher)])
    table = (out / "table.md").read_text()
    assert "| edsam | 62.0 ± 2.0 (n=3) | 32.0 ± 2.0 (n=3) |" in table
    assert "### zero-shot top-1 (%), buffer.distinct_sources=true" in table
    assert "| edsam (buffer.distinct_sources=true) | none | +10.0 ± 0.0 (1/1 > 0: +) |" in table
    assert "| edsam (buffer.distinct_sources=true) | edsam | +0.0 ± 0.0 (0/1 > 0: 0) |" in table  # vs its base
    run_dirs = [call.split()[1] for call in (tmp_path / "calls.log").read_text().splitlines()]
    assert run_dirs[-1].endswith("/runs/buffer.distinct_sources_true/edsam/seed0")
    assert not any("=" in d for d in run_dirs)  # launch.sh hands it to Hydra as run_dir=<folder>

    # --against pairs a sweep's runs with another sweep's (a control run in the same session)
    dg_study.main(["--methods", "edsam", "--core-seeds", "1", "--sweep", "buffer.distinct_sources=false",
                   "--against", "buffer.distinct_sources=true", "--out", str(out), "--launcher", str(launcher)])
    table = (out / "table.md").read_text()
    assert ("| edsam (buffer.distinct_sources=false) | edsam (buffer.distinct_sources=true) | +0.0 ± 0.0 (0/1 > 0: 0)"
            in table)
    assert "| edsam (buffer.distinct_sources=true) | edsam (buffer.distinct_sources=true) |" not in table


def test_quick_and_sweep_plans():
    quick = dg_study.plan(dg_study.parse_args(["--quick"]))
    assert [(m, s) for _, m, s, _ in quick] == [("none", 0), ("real2x", 0), ("edsam", 0)]
    full = dg_study.plan(dg_study.parse_args(["--methods", "none,masking", "--seeds", "2", "--core-seeds", "3"]))
    assert [(m, s) for _, m, s, _ in full] == [  # seed-major: an interrupted study stays balanced
        ("none", 0), ("masking", 0), ("none", 1), ("masking", 1), ("none", 2)]
    sweep = dg_study.plan(dg_study.parse_args(["--methods", "edsam", "--core-seeds", "1",
                                               "--sweep", "diffusion.rho=0.2,1.0"]))
    assert [(label, extra) for label, _, _, extra in sweep] == [
        ("diffusion.rho=0.2", ["diffusion.rho=0.2"]), ("diffusion.rho=1.0", ["diffusion.rho=1.0"])]


def test_a_steered_runs_feedback_and_the_alphas_it_sent_are_summarised(tmp_path):
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "config.yaml").write_text("diffusion:\n  rho: 1.0\n")
    (tmp_path / "metrics").mkdir()
    bins = lambda *shares: {f"policy/sent/{k:02d}": v for k, v in enumerate(shares)}  # noqa: E731
    records = [{"producer/sent": 100, **bins(1.0, 0.0, 0.0), "feedback/applied": 10},
               {"producer/sent": 300, **bins(0.0, 0.5, 0.5), "feedback/applied": 50,
                "feedback/dropped/replay": 2, "feedback/dropped/over_reported": 3}]
    (tmp_path / "metrics" / "producer0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "metrics" / "trainer0.jsonl").write_text(json.dumps({"step": 9, "train/extra_samples": 4000}) + "\n")
    summary = dg_study.producer_summary(tmp_path)
    # bins centred at -2/3, 0, +2/3: 100 samples at |2/3|, 100 at 0, 100 at 2/3
    assert summary["alpha_abs_sent"] == pytest.approx(4 / 9)
    assert (summary["generated"], summary["drawn"], summary["feedback_applied"], summary["feedback_dropped"]) \
        == (300, 4000, 50, 5)
