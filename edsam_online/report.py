"""``edsam-report RUN [RUN ...]``: plots and one self-contained ``report.html`` from run folders' metrics JSONL alone.

Reads each run's ``metrics/trainer0.jsonl`` (rank 0 logs evaluation), ``metrics/producer*.jsonl``
and resolved config ``hydra/config.yaml``. One run writes into ``<run>/report/``; several runs
are overlaid in the same plots (one colour per run, labelled by the run folder's name or
``--labels``) and written into ``./report-compare/``; ``--out`` overrides either.

Plots: ``losses.png`` (real, extra, total, logit scale); ``eval.png`` (zero-shot and linear
probe top-1 in %, the source domain drawn thick and labelled "(source)", a grey chance line
at 100 / classes: 10 classes on the built-in domains, an ImageFolder's folder count or a
class-names file's lines for other sets, and a legend entry instead of a line where the count
is unknown; several runs get one panel per domain); ``training.png`` (learning rate,
samples/s, step time, the extra share actually trained on, steps without an extra term,
genuine and fallback extra samples); ``buffer.png`` (fill, inserts/s against samples/s,
reuse histogram, sample age); ``producer.png`` (samples/s and send-blocked time per
producer); ``policy.png`` (with ``producer.policy=adversarial``: the alpha histogram of the
samples sent over time, feedback applied and dropped, the reward estimated per alpha bin);
``data_wait.png``. ``--x time`` puts wall-clock time since the run's first record (any of its
metrics files) on the x axis of every time series instead of the trainer step (producer
plots: samples sent).

``report.html`` holds the final table, the sample ledger (:mod:`edsam_online.ledger`: where every
generated sample went, over all producers and trainer ranks, and whether the counts balance),
every plot, the config and, when a run logged samples (``logging.sample_every``,
``<run>/samples/``), a grid of them per logged step, newest first: each image with its caption,
alpha, producer, age, score and source key, beside a thumbnail of the real image it came from
where ``samples.jsonl`` names one (``source_image``, a path under ``<run>/samples/``). Every
image is embedded as a ``data:`` URI, so the page alone can be copied or mailed. W&B draws the
same curves and table from its own run; this is for runs without it (offline clusters, CI), so
nothing here imports wandb.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edsam_online.ledger import format_ledger, ledger
from edsam_online.metrics import SAMPLES_DIR, read_jsonl
from edsam_online.policy import bin_edges

PLOTS = ("losses.png", "eval.png", "training.png", "buffer.png", "producer.png", "policy.png", "data_wait.png")
EVAL_PREFIXES = {"zero-shot top-1": "eval/zeroshot_top1/", "linear probe top-1": "eval/linear_probe/"}
SAMPLE_STEPS_SHOWN = 8  # the newest logged steps drawn as grids; samples.jsonl keeps them all
COMPARE_OUT = "report-compare"  # several runs' default output folder, under the working directory
LINESTYLES = ("-", "--", ":", "-.")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass
class Run:
    """One run folder's metrics and resolved config."""

    dir: Path
    label: str
    records: list[dict]  # metrics/trainer0.jsonl
    producers: dict[str, list[dict]] = field(default_factory=dict)  # producer<rank> -> records
    config: dict = field(default_factory=dict)
    start: float | None = None  # the time of the run's first record, over all its metrics files
    end: float | None = None  # and of its last


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """A run folder's trainer and producer records and config; the label defaults to the folder's name."""
    run_dir = Path(run_dir)
    trainer_log = run_dir / "metrics" / "trainer0.jsonl"
    if not trainer_log.is_file():
        raise FileNotFoundError(f"{trainer_log} not found: is {run_dir} a run folder?")
    records = read_jsonl(trainer_log)
    producers = {p.stem: read_jsonl(p) for p in sorted((run_dir / "metrics").glob("producer*.jsonl"))}
    times = [r["time"] for recs in (records, *producers.values()) for r in recs
             if isinstance(r.get("time"), (int, float))]
    return Run(run_dir, label or run_dir.resolve().name, records, producers, _resolved_config(run_dir),
               min(times, default=None), max(times, default=None))


_SECONDS = {"s": 1.0, "min": 60.0, "h": 3600.0}


@dataclass
class XAxis:
    """What a time series is drawn over: ``step`` (a record's counter: the trainer step, or
    samples sent for producer records) or ``time`` (wall-clock since the run's first record,
    in ``unit``)."""

    mode: str = "step"
    unit: str = "s"

    @classmethod
    def for_runs(cls, runs: Sequence[Run], mode: str) -> XAxis:
        """The unit fits the longest run: seconds up to 2 minutes, minutes up to 2 hours, then hours."""
        if mode not in ("step", "time"):
            raise ValueError(f"--x: 'step' or 'time', got {mode!r}")
        span = max((run.end - run.start for run in runs if run.start is not None), default=0.0)
        return cls(mode, "s" if span <= 120 else "min" if span <= 7200 else "h")

    def label(self, counter: str = "trainer step") -> str:
        return counter if self.mode == "step" else f"wall-clock time since the run's first record ({self.unit})"

    def at(self, run: Run, record: dict, counter: str = "step") -> float | None:
        """A record's x; None where it lacks one."""
        if self.mode == "step":
            return record.get(counter)
        t = record.get("time")
        return None if t is None or run.start is None else (t - run.start) / _SECONDS[self.unit]

    def series(self, run: Run, records: list[dict], key: str, counter: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of every record holding a finite ``key`` and an x."""
        pts = [(x, r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
               and (x := self.at(run, r, counter)) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, runs: Sequence[Run], keys: list[str], title: str, xaxis: XAxis) -> None:
    """``keys`` of every run's trainer records; one run: a colour per key, several: a colour
    per run and a line style per key."""
    drawn = False
    for i, run in enumerate(runs):
        for j, key in enumerate(keys):
            xs, ys = xaxis.series(run, run.records, key)
            if not xs:
                continue
            short = key.split("/", 1)[-1]
            style = {"label": short} if len(runs) == 1 else {
                "color": f"C{i}", "linestyle": LINESTYLES[j % len(LINESTYLES)],
                "label": run.label if len(keys) == 1 else f"{run.label}: {short}"}
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, **style)  # evaluation has a few points: mark them
            drawn = True
    ax.set_title(title)
    ax.set_xlabel(xaxis.label())
    if drawn:
        ax.legend(fontsize=7)
    else:
        _empty(ax, "not logged in this run" if len(runs) == 1 else "not logged in these runs")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)


def final_table(records: list[dict]) -> list[tuple[str, float | None, float | None]]:
    """(domain, zero-shot, linear probe) of the last evaluation, source and targets first."""
    last: dict[str, float] = {}
    for r in records:
        last.update({k: v for k, v in r.items() if k.startswith(tuple(EVAL_PREFIXES.values()))})
    names = {k.split("/", 2)[2] for k in last} - {"source"}
    means = sorted(n for n in names if n.endswith("_mean") and n != "target_mean")
    domains = sorted(names - {"target_mean", *means})
    domains += [d for d in ("target_mean", *means) if d in names]
    zs, lp = EVAL_PREFIXES.values()
    return [(d, last.get(zs + d), last.get(lp + d)) for d in domains]


def class_count(config: dict, prefix: str, name: str) -> int | None:
    """How many classes a top-1 under ``prefix`` on set ``name`` chooses among, from the
    resolved config: the built-in classes for the built-in domains and their summaries (and
    for the linear probe unless ``eval.probe_train`` names other data; a run without a config
    is taken to be on built-in data); for another set (or the probe's training set) its
    class-names file's lines or its ImageFolder's class folders, where they exist here; else None."""
    from edsam_online.data.domains import DOMAINS
    from edsam_online.data.shapes import CLASSES

    ev = config.get("eval") or {}
    extra = {**(ev.get("imagefolders") or {}), **(ev.get("webdatasets") or {})}
    if prefix == EVAL_PREFIXES["linear probe top-1"]:
        probe = ev.get("probe_train") or ""
        if not probe:
            return len(CLASSES)
        name, path = (probe, extra[probe]) if probe in extra else ("probe_train", probe)  # a set's name, or a path
    elif name in DOMAINS or name in ("source", "target_mean") or name.endswith("_mean"):
        return len(CLASSES)  # EvalConfig: summaries and target groups are over built-in domains only
    elif (path := extra.get(name)) is None:
        return None
    names_file = (ev.get("classnames") or {}).get(name)
    if names_file:  # eval.read_classnames: one name per non-blank line
        if not os.path.isfile(names_file):
            return None
        with open(names_file, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip()) or None
    if os.path.isdir(path):  # torchvision ImageFolder: one class per sub-folder
        return sum(1 for e in os.scandir(path) if e.is_dir()) or None
    return None


def _eval_names(run: Run, prefix: str) -> list[str]:
    """The sets under ``prefix`` to draw, in final-table order; ``source`` only where the
    source domain itself was not logged under its name."""
    from edsam_online.data.domains import SOURCE_DOMAIN

    names = [d for d, *_ in final_table(run.records) if any(prefix + d in r for r in run.records)]
    if SOURCE_DOMAIN not in names and any(prefix + "source" in r for r in run.records):
        names.insert(0, "source")
    return names


def _is_source(name: str) -> bool:
    from edsam_online.data.domains import SOURCE_DOMAIN

    return name in (SOURCE_DOMAIN, "source")


def _source_label(name: str) -> str:
    return f"{name} (source)" if name != "source" else "source"


def _chance_lines(ax, runs: Sequence[Run], sets: list[tuple[str, str, str]]) -> None:
    """A grey line at 100 / classes per distinct class count of ``sets`` (legend name, metric
    prefix, set name) over ``runs``, and a legend entry naming those whose count is unknown."""
    levels: dict[int, list[str]] = {}
    unknown: list[str] = []
    for what, prefix, name in sets:
        for n in {class_count(run.config, prefix, name) for run in runs}:
            (unknown if n is None else levels.setdefault(n, [])).append(what)
    for k, (n, members) in enumerate(sorted(levels.items())):
        which = "" if len(levels) == 1 and not unknown else f": {', '.join(dict.fromkeys(members))}"
        ax.axhline(100 / n, color="0.5", linestyle=LINESTYLES[k % len(LINESTYLES)], linewidth=1,
                   label=f"chance ({n} classes{which})")
    if unknown:
        ax.plot([], [], " ", label=f"no chance line for {', '.join(dict.fromkeys(unknown))} (classes unknown)")


def eval_figure(runs: Sequence[Run], xaxis: XAxis):
    """``eval.png``: top-1 in %. One run: a panel per metric, a line per set; several: a panel
    per set (the source first), a colour per run, zero-shot solid and linear probe dashed."""
    import matplotlib.pyplot as plt

    if len(runs) == 1:
        run = runs[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (title, prefix) in zip(axes, EVAL_PREFIXES.items()):
            names = _eval_names(run, prefix)
            for name in names:
                xs, ys = xaxis.series(run, run.records, prefix + name)
                source = _is_source(name)
                ax.plot(xs, [100 * y for y in ys], marker="o" if len(xs) < 20 else None,
                        label=_source_label(name) if source else name,
                        **({"color": "k", "linewidth": 2.8} if source else {}))
            _eval_axes(ax, title, xaxis, runs, [(name, prefix, name) for name in names])
        return fig
    names = dict.fromkeys(n for run in runs for prefix in EVAL_PREFIXES.values() for n in _eval_names(run, prefix))
    names = sorted(names, key=lambda n: not _is_source(n))
    cols = min(3, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        source = _is_source(name)
        logged = []
        for j, (metric, prefix) in enumerate(EVAL_PREFIXES.items()):
            metric = metric.removesuffix(" top-1")
            for i, run in enumerate(runs):
                xs, ys = xaxis.series(run, run.records, prefix + name)
                if xs:
                    ax.plot(xs, [100 * y for y in ys], color=f"C{i}", linestyle=LINESTYLES[j],
                            linewidth=2.8 if source else 1.5, marker="o" if len(xs) < 20 else None,
                            label=f"{run.label}: {metric}")
                    logged.append((metric, prefix, name))
        _eval_axes(ax, _source_label(name) if source else name, xaxis, runs, list(dict.fromkeys(logged)))
        if source:
            ax.title.set_fontweight("bold")
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    if not names:
        _empty(axes[0, 0], "no evaluation logged in these runs")
    return fig


def _eval_axes(ax, title: str, xaxis: XAxis, runs: Sequence[Run], sets: list[tuple[str, str, str]]) -> None:
    if sets:
        _chance_lines(ax, runs, sets)
        ax.legend(fontsize=7)
    else:
        _empty(ax, "not logged in this run")
    ax.set_title(title)
    ax.set_xlabel(xaxis.label())
    ax.set_ylabel("top-1 (%)")


def training_figure(runs: Sequence[Run], xaxis: XAxis):
    """``training.png``: learning rate, throughput and how much of the extra batch was genuine."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    panels = ((["train/lr"], "learning rate"), (["train/samples_per_s"], "samples/s (real + extra, all ranks)"),
              (["train/step_time_s"], "step time (s)"),
              (["train/extra_share_actual"], "extra share actually trained on (genuine / real)"),
              (["train/steps_without_extra"], "steps without an extra term (running total)"),
              (["train/extra_samples", "train/extra_fallback_samples"], "extra samples: genuine, fallback (totals)"))
    for ax, (keys, title) in zip(axes.flat, panels):
        _line(ax, runs, keys, title, xaxis)
    return fig


def logged_samples(run_dir: Path) -> dict[int, list[dict]]:
    """``samples/samples.jsonl`` by step (ascending), each step's rows in order; where a step
    was logged twice (a rerun after a crash) its last rows win, as its image files do."""
    path = run_dir / SAMPLES_DIR / "samples.jsonl"
    by_step: dict[int, dict[int, dict]] = {}
    for record in read_jsonl(path) if path.is_file() else []:
        by_step.setdefault(record["step"], {})[record["row"]] = record
    return {step: [rows[i] for i in sorted(rows)] for step, rows in sorted(by_step.items())}


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _embedded_img(path: Path, alt: str) -> str:
    """An ``<img>`` holding the file, or a note naming the file where it is missing."""
    if not path.is_file():
        return f'<div class="missing">missing: {html.escape(str(path))}</div>'
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f'<img src="{_data_uri(path.read_bytes(), mime)}" alt="{html.escape(alt)}">'


def _sample_figure(record: dict, run_dir: Path) -> str:
    facts = [f"&alpha; {record['alpha']:+.2f}" if record.get("alpha") is not None else None,
             html.escape(record["producer"]) if record.get("producer") else None,
             f"age {record['age_steps']}" if record.get("age_steps") is not None else None,
             f"score {record['score']:.2f}" if record.get("score") is not None else None]
    images, wide = _embedded_img(run_dir / record["image"], "sample"), ""
    if record.get("source_image"):
        images = (f'<div class="pair">{_embedded_img(run_dir / SAMPLES_DIR / record["source_image"], "source")}'
                  f"{images}</div>")
        wide = ' class="wide"'
    return (f'<figure{wide}>{images}'
            f'<figcaption>{html.escape(record["caption"])}'
            f'<br><small>{" &middot; ".join(f for f in facts if f)}<br>'
            f'<code>{html.escape(record["source_key"])}</code></small></figcaption></figure>')


def _samples_section(run: Run, heading: str) -> str:
    samples = logged_samples(run.dir)
    if not samples:
        return ""
    steps = sorted(samples, reverse=True)[:SAMPLE_STEPS_SHOWN]
    more = len(samples) - len(steps)
    paired = any(r.get("source_image") for step in steps for r in samples[step])
    parts = [f"<h2>{html.escape(heading)}</h2><p>Extra-batch rows trainer rank 0 trained on, as trained "
             "(after the training transform), newest step first; age = trainer steps since the replay "
             "buffer took the sample in."
             f"{' Where known, the real image a sample came from stands on its left.' if paired else ''}"
             f"{f' {more} earlier steps are in samples/samples.jsonl.' if more else ''}</p>"]
    for step in steps:
        figures = "".join(_sample_figure(r, run.dir) for r in samples[step])
        parts.append(f'<h3>step {step}</h3><div class="grid">{figures}</div>')
    return "\n".join(parts)


def render(run_dirs: str | Path | Sequence[str | Path], out: str | Path | None = None,
           labels: Sequence[str] | None = None, x: str = "step") -> Path:
    """Write every plot and ``report.html`` for one run or several overlaid (``labels``: one
    legend label per run; ``x``: ``step`` or ``time``, see :class:`XAxis`); returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not dirs:
        raise ValueError("no run folder given")
    if labels is not None and len(labels) != len(dirs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(dirs)} runs")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    if labels is None and len({r.label for r in runs}) < len(runs):
        for run, d in zip(runs, dirs):  # two folders of one name: label by the path given
            run.label = str(d)
    xaxis = XAxis.for_runs(runs, x)
    out = Path(out) if out else runs[0].dir / "report" if len(runs) == 1 else Path(COMPARE_OUT)
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, runs, ["train/loss", "train/loss_real", "train/loss_extra"], "losses (Eq. 11)", xaxis)
    scale = ax.twinx()
    for i, run in enumerate(runs):
        scale.plot(*xaxis.series(run, run.records, "train/logit_scale"), "--", linewidth=0.8,
                   color="k" if len(runs) == 1 else f"C{i}")
    scale.set_ylabel("logit scale (dashed)")
    _save(fig, out / "losses.png")

    _save(eval_figure(runs, xaxis), out / "eval.png")
    _save(training_figure(runs, xaxis), out / "training.png")

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    _line(axes[0, 0], runs, ["buffer/fill"], "buffer fill", xaxis)
    _line(axes[0, 1], runs, ["buffer/inserts_per_s", "buffer/samples_per_s"], "inserts/s and samples/s", xaxis)
    hist = [f"buffer/reuse_hist/{i}" for i in range(8)] + ["buffer/reuse_hist/ge8"]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        last = {k: v for r in run.records for k, v in r.items() if k in hist}
        axes[1, 0].bar([k + (i - (len(runs) - 1) / 2) * width for k in range(len(hist))],
                       [last.get(k, 0) for k in hist], width, label=run.label, color=f"C{i}")
    axes[1, 0].set_xticks(range(len(hist)), [k.rsplit("/", 1)[1] for k in hist])
    axes[1, 0].set_title("uses per item at removal (last record)")
    if len(runs) > 1:
        axes[1, 0].legend(fontsize=7)
    _line(axes[1, 1], runs, ["buffer/sample_age_steps_mean", "buffer/sample_age_steps_p90"], "sample age (steps)",
          xaxis)
    _save(fig, out / "buffer.png")

    _producer_figure(runs, xaxis, out)
    _policy_figure(runs, xaxis, out)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    _line(ax, runs, ["train/data_wait_frac"], "share of step time waiting for data", xaxis)
    _save(fig, out / "data_wait.png")

    (out / "report.html").write_text(_page(runs, out, xaxis), encoding="utf-8")
    return out / "report.html"


def _producers(runs: Sequence[Run]) -> list[tuple[str, int, int, list[dict]]]:
    """(legend label, run index, producer index within its run, records) of every producer."""
    return [(name if len(runs) == 1 else f"{run.label}: {name}", i, j, recs)
            for i, run in enumerate(runs) for j, (name, recs) in enumerate(run.producers.items())]


def _producer_figure(runs: Sequence[Run], xaxis: XAxis, out: Path) -> None:
    """``producer.png``: samples/s and send-blocked time per producer."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    producers = _producers(runs)
    for label, i, j, recs in producers:
        for ax, key in zip(axes, ("producer/samples_per_s", "producer/send_blocked_s")):
            style = {} if len(runs) == 1 else {"color": f"C{i}", "linestyle": LINESTYLES[j % len(LINESTYLES)]}
            ax.plot(*xaxis.series(runs[i], recs, key, counter="producer/sent"), label=label, **style)
    for ax, title in zip(axes, ("producer samples/s", "producer send-blocked time (s, total)")):
        ax.set_title(title)
        ax.set_xlabel(xaxis.label("samples sent"))
        if producers:
            ax.legend(fontsize=7)
        else:
            _empty(ax, "no producer in this run" if len(runs) == 1 else "no producer in these runs")
    _save(fig, out / "producer.png")


def alpha_histogram(records: list[dict]) -> tuple[list[float], list[list[float]]]:
    """A steered producer's alpha histogram over time: the samples sent at each of its records,
    and per alpha bin (rows, lowest alpha first) the share of the samples sent since the record
    before that fell in it (``policy/sent/<bin>``)."""
    recs = [r for r in records if "policy/sent/00" in r]
    if not recs:
        return [], []
    bins = sum(1 for k in recs[0] if k.startswith("policy/sent/"))
    return ([r.get("producer/sent", i) for i, r in enumerate(recs)],
            [[r.get(f"policy/sent/{k:02d}", math.nan) for r in recs] for k in range(bins)])


def _policy_figure(runs: Sequence[Run], xaxis: XAxis, out: Path) -> None:
    """``policy.png``: for ``producer.policy=adversarial``, the alpha histogram of the samples
    sent over time (one column per record of the first steered producer), each steered
    producer's feedback applied and dropped, and the reward it estimates per alpha bin at
    the end."""
    import matplotlib.pyplot as plt

    steered = [p for p in _producers(runs) if any("policy/sent/00" in r for r in p[3])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if not steered:
        for ax in axes:
            _empty(ax, "no steered producer in this run (producer.policy=uniform)" if len(runs) == 1
                   else "no steered producer in these runs (producer.policy=uniform)")
            ax.set_axis_off()
        _save(fig, out / "policy.png")
        return
    name, i, _, recs = steered[0]
    sent, grid = alpha_histogram(recs)
    xs = [xaxis.at(runs[i], r, "producer/sent") for r in recs if "policy/sent/00" in r]
    xlabel = xaxis.label("samples sent")
    if xaxis.mode == "step" or None in xs:
        xs, xlabel = sent, "samples sent"
    rho = float(runs[i].config.get("diffusion", {}).get("rho", 1.0))
    shown = axes[0].imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                           extent=(xs[0], max(xs[-1], xs[0] + 1e-9), -rho, rho))
    fig.colorbar(shown, ax=axes[0], label="share of samples sent")
    axes[0].set_title(f"alpha of the samples sent ({name})")
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel("alpha")
    for k, (label, i, _, recs_) in enumerate(steered):
        color = f"C{k}" if len(runs) == 1 else f"C{i}"
        axes[1].plot(*xaxis.series(runs[i], recs_, "feedback/applied", counter="producer/sent"), "-", color=color,
                     label=f"{label} applied")
        dropped = [{**{c: r[c] for c in ("producer/sent", "time") if c in r},
                    "dropped": sum(v for key, v in r.items() if key.startswith("feedback/dropped/"))}
                   for r in recs_ if "feedback/applied" in r]
        axes[1].plot(*xaxis.series(runs[i], dropped, "dropped", counter="producer/sent"), ":", color=color,
                     label=f"{label} dropped (all reasons)")
        bins = sum(1 for key in recs_[-1] if key.startswith("policy/sent/")) or len(grid)
        edges = bin_edges(float(runs[i].config.get("diffusion", {}).get("rho", 1.0)), bins)
        axes[2].plot((edges[:-1] + edges[1:]) / 2, [recs_[-1].get(f"policy/reward/{b:02d}", math.nan)
                                                    for b in range(bins)], "o-", color=color, label=label)
    axes[1].set_title("feedback entries")
    axes[1].set_xlabel(xaxis.label("samples sent"))
    axes[1].legend(fontsize=7)
    axes[2].set_title("estimated reward per alpha bin (last record)")
    axes[2].set_xlabel("alpha")
    axes[2].set_ylabel("fidelity-gated loss (nats)")
    axes[2].legend(fontsize=7)
    _save(fig, out / "policy.png")


def _resolved_config(run_dir: Path) -> dict:
    """The run's resolved config (``hydra/config.yaml``) as a plain dict; {} without one."""
    import yaml

    path = run_dir / "hydra" / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _config_text(run_dir: Path) -> str:
    path = run_dir / "hydra" / "config.yaml"
    return path.read_text() if path.is_file() else "(no hydra/config.yaml in this run)"


def _table(runs: Sequence[Run]) -> str:
    """The last evaluation of every run: a row per set, zero-shot and linear probe per run."""
    finals = [{d: (z, p) for d, z, p in final_table(run.records)} for run in runs]
    domains = list(dict.fromkeys(d for run in runs for d, *_ in final_table(run.records)))
    head = "<tr><th>domain</th><th>zero-shot</th><th>linear probe</th></tr>"
    if len(runs) > 1:
        head = ("<tr><th></th>" + "".join(f'<th colspan="2">{html.escape(r.label)}</th>' for r in runs) + "</tr>"
                "<tr><th>domain</th>" + "<th>zero-shot</th><th>linear probe</th>" * len(runs) + "</tr>")
    rows = "".join(f"<tr><td>{html.escape(d)}</td>"
                   + "".join(f"<td>{_pct(f.get(d, (None, None))[0])}</td><td>{_pct(f.get(d, (None, None))[1])}</td>"
                             for f in finals) + "</tr>" for d in domains)
    return f"<table>{head}{rows}</table>"


def _page(runs: Sequence[Run], out: Path, xaxis: XAxis) -> str:
    """``report.html``: the final table, the logged samples, every plot and the runs' configs,
    every image embedded."""
    single = len(runs) == 1
    title = f"Run {runs[0].dir}" if single else f"Runs {', '.join(r.label for r in runs)}"
    runs_list = "" if single else "<ul>" + "".join(
        f'<li><span style="color:{_colour(i)}">{html.escape(r.label)}</span>: '
        f"<code>{html.escape(str(r.dir))}</code></li>"
        for i, r in enumerate(runs)) + "</ul>"
    samples = "".join(_samples_section(r, "Training samples" if single else f"Training samples: {r.label}")
                      for r in runs)
    plots = "".join(f'<h2>{html.escape(p[:-4].replace("_", " "))}</h2>{_embedded_img(out / p, p)}' for p in PLOTS)
    configs = "".join(
        f'<h2>Config{"" if single else ": " + html.escape(r.label)}</h2><pre>{html.escape(_config_text(r.dir))}</pre>'
        for r in runs)
    ledgers = "".join(f'<h2>Sample ledger{"" if single else ": " + html.escape(r.label)}</h2>'
                      f"<pre>{html.escape(format_ledger(ledger(r.dir)))}</pre>" for r in runs)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edsam-online {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 10px;text-align:right}}
img{{max-width:100%}}pre{{background:#f4f4f4;padding:8px;overflow:auto;max-height:400px}}
.grid{{display:flex;flex-wrap:wrap;gap:6px}}figure{{margin:0;width:128px;font-size:11px;line-height:1.25}}
figure.wide{{width:262px}}.pair{{display:flex;gap:6px}}
.missing{{width:128px;height:128px;background:#eee;overflow:hidden}}
figure img{{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;display:block}}</style></head><body>
<h1>{html.escape(title)}</h1>{runs_list}
<p>x axis: {html.escape(xaxis.label())}.</p>
<h2>Final evaluation (top-1, %)</h2>
{_table(runs)}
{ledgers}
{samples}
{plots}
{configs}
</body></html>
"""


def _colour(i: int) -> str:
    """Matplotlib's default colour cycle ``C<i>`` as a CSS colour."""
    from matplotlib.colors import to_hex

    return to_hex(f"C{i}")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edsam-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN",
                   help="a run folder (scripts/launch.sh --run-dir, or runs/<time>)")
    p.add_argument("--out", help=f"where to write (default: RUN/report with one run, ./{COMPARE_OUT} with several)")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: the run folders' names)")
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="x axis of every time series: the trainer step, or wall-clock time since the run's "
                        "first record")
    args = p.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        print(render(args.run_dirs, args.out, labels, args.x))
    except (FileNotFoundError, ValueError) as err:
        print(f"edsam-report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
