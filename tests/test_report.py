"""edsam-report renders every plot and report.html from a run folder's JSONL alone."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from edsam_online.metrics import read_jsonl
from edsam_online.report import (PLOTS, Run, XAxis, alpha_histogram, class_count, eval_figure, final_table, load_run,
                                 main, render, training_figure)

FIXTURE = Path(__file__).parent / "fixtures" / "edsam_run"  # metrics and config of a cpu_demo edsam run, thinned


def test_the_report_has_every_plot_the_final_table_and_the_config(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    page = render(run)
    assert page == run / "report" / "report.html"
    for name in PLOTS:
        png = run / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f'<img src="{_uri(png)}" alt="{name}">' in page.read_text()  # embedded
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
        src = f'<img src="{_uri(run / record["image"])}" alt="sample">'
        assert src in section and (run / record["image"]).is_file()
        figure = section[section.index(src):].split("</figure>")[0]
        assert record["caption"] in figure and f"&alpha; {record['alpha']:+.2f}" in figure
        assert f"age {record['age_steps']}" in figure and record["producer"] in figure
        assert record["source_key"] in figure and f"score {record['score']:.2f}" in figure
    shutil.rmtree(run / "samples")
    assert "Training samples" not in render(run).read_text()  # a run that logged none has no such section


def test_a_steered_producers_alpha_histogram_over_time_is_drawn(tmp_path):
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


def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def _images(text: str) -> list[dict]:
    parser = _Images()
    parser.feed(text)
    return parser.images


def test_several_runs_are_overlaid_in_one_report_labelled_by_name_or_labels(tmp_path, monkeypatch, capsys):
    a = shutil.copytree(FIXTURE, tmp_path / "seed0")
    b = shutil.copytree(FIXTURE, tmp_path / "seed1")
    records = read_jsonl(b / "metrics" / "trainer0.jsonl")
    _write_jsonl(b / "metrics" / "trainer0.jsonl",
                 [{k: v / 2 if k.startswith("eval/") else v for k, v in r.items()} for r in records])
    runs = [load_run(a), load_run(b)]
    assert [r.label for r in runs] == ["seed0", "seed1"]
    fig = eval_figure(runs, XAxis())
    source = fig.axes[0]  # a panel per set, the source first, a colour per run
    assert source.get_title() == "flat (source)"
    lines = {line.get_label(): line for line in source.get_lines()}
    last_a = [r["eval/zeroshot_top1/flat"] for r in records if "eval/zeroshot_top1/flat" in r]
    assert list(lines["seed0: zero-shot"].get_ydata()) == [100 * v for v in last_a]
    assert list(lines["seed1: zero-shot"].get_ydata()) == [50 * v for v in last_a]
    assert lines["seed0: zero-shot"].get_color() != lines["seed1: zero-shot"].get_color()

    assert main([str(a), str(b), "--labels", "ours,baseline,extra"]) == 2
    assert "3 labels for 2 runs" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b), "--labels", "ours,baseline"]) == 0
    page = tmp_path / "report-compare" / "report.html"  # several runs: under the working directory
    assert capsys.readouterr().out.strip() == str(Path("report-compare") / "report.html")
    text = page.read_text()
    assert "<h1>Runs ours, baseline</h1>" in text and str(a) in text and str(b) in text
    assert '<th colspan="2">ours</th><th colspan="2">baseline</th>' in text
    zs, lp = dict((d, (z, p)) for d, z, p in final_table(records))["flat"]
    assert f"<td>flat</td><td>{100 * zs:.1f}</td><td>{100 * lp:.1f}</td><td>{50 * zs:.1f}</td>" in text
    assert "Training samples: ours" in text and "Training samples: baseline" in text
    for name in PLOTS:
        assert (tmp_path / "report-compare" / name).stat().st_size > 5000, name
    assert not (a / "report").exists()


def test_eval_is_drawn_in_percent_with_the_source_marked_and_a_chance_line(tmp_path):
    run = load_run(FIXTURE)
    zero_shot, probe = eval_figure([run], XAxis()).axes
    lines = {line.get_label(): line for line in zero_shot.get_lines()}
    flat = [(r["step"], r["eval/zeroshot_top1/flat"]) for r in run.records if "eval/zeroshot_top1/flat" in r]
    assert list(lines["flat (source)"].get_xdata()) == [s for s, _ in flat]
    assert list(lines["flat (source)"].get_ydata()) == [100 * v for _, v in flat]
    assert lines["flat (source)"].get_linewidth() > lines["sketch"].get_linewidth()
    assert list(lines["chance (10 classes)"].get_ydata()) == [10, 10]  # 10 built-in classes
    assert "source" not in lines  # the same numbers as flat
    assert "chance (10 classes)" in {line.get_label() for line in probe.get_lines()}

    # other sets: the classes their config names, where it can be known here
    folder = tmp_path / "pacs"
    for name in ("dog", "cat", "horse"):
        (folder / name).mkdir(parents=True)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n\nc\nd\ne\n")
    config = {"eval": {"imagefolders": {"pacs": str(folder)}, "webdatasets": {"wds": "s-{0..3}.tar", "lost": "x.tar"},
                       "classnames": {"wds": str(names), "lost": str(tmp_path / "gone.txt")}}}
    zs, lp = "eval/zeroshot_top1/", "eval/linear_probe/"
    assert [class_count(config, zs, n) for n in ("pacs", "wds", "lost", "nowhere", "dark", "target_mean")] \
        == [3, 5, None, None, 10, 10]
    assert class_count(config, lp, "pacs") == 10  # the probe chooses among the built-in source classes
    assert class_count({"eval": {"probe_train": str(folder)}}, lp, "pacs") == 3
    assert class_count({"eval": {**config["eval"], "probe_train": "wds"}}, lp, "pacs") == 5  # a set's name
    assert class_count({}, zs, "flat") == 10 and class_count({}, lp, "flat") == 10  # no config: built-in data

    records = [{"step": 5, "time": 1.0, zs + "flat": 0.5, zs + "pacs": 0.4, zs + "lost": 0.3}]
    axes = eval_figure([Run(tmp_path, "x", records, config=config)], XAxis()).axes[0]
    labels = {line.get_label(): line for line in axes.get_lines()}
    assert list(labels["chance (10 classes: flat)"].get_ydata()) == [10, 10]
    assert list(labels["chance (3 classes: pacs)"].get_ydata()) == [100 / 3, 100 / 3]
    assert "no chance line for lost (classes unknown)" in labels
    assert [t.get_text() for t in axes.get_legend().get_texts()][-1] == "no chance line for lost (classes unknown)"


def test_the_training_plots_draw_lr_throughput_step_time_and_the_extra_share(tmp_path):
    run = load_run(FIXTURE)
    panels = training_figure([run], XAxis()).axes
    drawn = {line.get_label(): line for ax in panels for line in ax.get_lines()}
    for key in ("train/lr", "train/samples_per_s", "train/step_time_s", "train/extra_share_actual",
                "train/steps_without_extra", "train/extra_samples", "train/extra_fallback_samples"):
        logged = [(r["step"], r[key]) for r in run.records if key in r]
        assert logged, key
        line = drawn[key.split("/", 1)[1]]
        assert list(zip(line.get_xdata(), line.get_ydata())) == logged, key
    empty = training_figure([Run(tmp_path, "x", [{"step": 1, "time": 0.0}])], XAxis()).axes
    assert all(ax.texts[0].get_text() == "not logged in this run" for ax in empty)


def test_x_time_puts_the_seconds_since_the_runs_first_record_on_the_x_axis(tmp_path):
    run_dir = tmp_path / "run"
    _write_jsonl(run_dir / "metrics" / "trainer0.jsonl",
                 [{"step": 10 * i, "time": 1000.0 + 30 * i, "train/lr": 0.1 * i} for i in range(1, 4)])
    _write_jsonl(run_dir / "metrics" / "producer0.jsonl",  # the run's first record
                 [{"step": 64, "time": 1000.0, "producer/sent": 64, "producer/samples_per_s": 2.0}])
    run = load_run(run_dir)
    xaxis = XAxis.for_runs([run], "time")
    assert (xaxis.mode, xaxis.unit) == ("time", "s")  # 90 s
    line = training_figure([run], xaxis).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [30.0, 60.0, 90.0]
    assert training_figure([run], xaxis).axes[0].get_xlabel() == "wall-clock time since the run's first record (s)"
    longer = Run(run_dir, "y", [], start=0.0, end=3 * 3600.0)
    assert XAxis.for_runs([run, longer], "time").unit == "h"
    assert XAxis.for_runs([run], "time").series(run, run.records, "train/lr")[0] == [30.0, 60.0, 90.0]


def test_the_page_is_self_contained_and_shows_a_samples_source_beside_it(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    samples = read_jsonl(run / "samples" / "samples.jsonl")
    thumb = run / "samples" / "sources" / "flat-0-00004984.png"
    thumb.parent.mkdir()
    Image.new("RGB", (16, 16), (255, 0, 255)).save(thumb)
    samples[2]["source_image"] = "sources/flat-0-00004984.png"  # step 200, row 0; relative to samples/
    samples[3]["source_image"] = "sources/not-there.png"
    _write_jsonl(run / "samples" / "samples.jsonl", samples)

    page = render(run)
    mailed = tmp_path / "mailed.html"  # the page alone, with nothing beside it
    shutil.copy(page, mailed)
    shutil.rmtree(run)
    text = mailed.read_text()
    images = _images(text)
    assert images and all(i["src"].startswith("data:image/png;base64,") for i in images)
    decoded = {}
    for image in images:
        with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as img:
            img.load()
            decoded.setdefault(image["alt"], []).append(img)
    assert set(decoded) == {*PLOTS, "sample", "source"}
    assert len(decoded["sample"]) == 4 and len(decoded["source"]) == 1
    assert decoded["source"][0].getpixel((3, 3)) == (255, 0, 255)
    step200 = text[text.index("<h3>step 200</h3>"):text.index("<h3>step 150</h3>")]
    paired, missing = step200.split("</figure>")[:2]
    assert paired.index('alt="source"') < paired.index('alt="sample"')  # the real image on the left
    assert "missing: " in missing and "not-there.png" in missing and 'alt="sample"' in missing
    assert 'alt="source"' not in text[text.index("<h3>step 150</h3>"):]  # rows without the field: the sample alone
