"""edsam-report renders every plot and report.html from a run folder's JSONL alone."""

import shutil
from pathlib import Path

from edsam_online.report import PLOTS, alpha_histogram, final_table, main, render
from edsam_online.metrics import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "edsam_run"  # metrics and config of a cpu_demo edsam run, thinned


def test_the_report_has_every_plot_the_final_table_and_the_config(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    page = render(run)
    assert page == run / "report" / "report.html"
    for name in PLOTS:
        png = run / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f'<img src="{name}">' in page.read_text()
    text = page.read_text()
    table = dict((d, (z, p)) for d, z, p in final_table(read_jsonl(run / "metrics" / "trainer0.jsonl")))
    assert set(table) == {"clutter", "dark", "flat", "noisy", "palette", "sketch", "target_mean"}
    zs, lp = table["flat"]
    assert f"<td>flat</td><td>{100 * zs:.1f}</td><td>{100 * lp:.1f}</td>" in text  # the last evaluation
    assert "method:" in text and "name: edsam" in text  # the resolved config


def test_a_folder_without_metrics_is_refused_by_name(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "trainer0.jsonl not found" in capsys.readouterr().err


def test_the_report_shows_the_logged_samples_newest_step_first_with_their_captions(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    text = render(run).read_text()
    section = text[text.index("<h2>Training samples</h2>"):text.index("<h2>losses</h2>")]
    assert section.index("<h3>step 200</h3>") < section.index("<h3>step 150</h3>")  # newest first
    for record in read_jsonl(run / "samples" / "samples.jsonl"):
        src = f'<img src="../{record["image"]}" alt="sample">'  # relative to report/, where the page is
        assert src in section and (run / record["image"]).is_file()
        figure = section[section.index(src):].split("</figure>")[0]
        assert record["caption"] in figure and f"&alpha; {record['alpha']:+.2f}" in figure
        assert f"age {record['age_steps']}" in figure and record["producer"] in figure
        assert record["source_key"] in figure and f"score {record['score']:.2f}" in figure
    shutil.rmtree(run / "samples")
    assert "Training samples" not in render(run).read_text()  # a run that logged none has no such section


def test_a_steered_producers_alpha_histogram_over_time_is_drawn(tmp_path):
    import json

    run = shutil.copytree(FIXTURE, tmp_path / "run")
    records = [{"producer/sent": 64 * (i + 1), **{f"policy/sent/{k:02d}": float(k == min(i, 2)) for k in range(3)},
                "feedback/applied": 100 * i, "policy/reward/00": 2.0, "policy/reward/01": 2.5, "policy/reward/02": 3.0}
               for i in range(4)]
    (run / "metrics" / "producer1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sent, grid = alpha_histogram(records)
    assert sent == [64, 128, 192, 256]
    assert grid == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]  # moving up the bins
    assert alpha_histogram(read_jsonl(run / "metrics" / "producer0.jsonl")) == ([], [])  # a uniform producer
    render(run)
    assert (run / "report" / "policy.png").stat().st_size > 5000
