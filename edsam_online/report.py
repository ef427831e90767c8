"""``edsam-report RUN_DIR``: a run's plots and one ``report.html``, from its metrics JSONL alone.

Reads ``<run_dir>/metrics/trainer0.jsonl`` (rank 0 logs evaluation), ``producer*.jsonl``
and the resolved config ``<run_dir>/hydra/config.yaml``, and writes into
``<run_dir>/report/`` (or ``--out``): ``losses.png`` (real, synthetic, total, logit scale),
``eval.png`` (zero-shot and linear probe per domain over steps), ``buffer.png`` (fill,
inserts/s against samples/s, reuse histogram, sample age), ``producer.png`` (samples/s and
send-blocked time per producer), ``policy.png`` (with ``producer.policy=adversarial``: the
alpha histogram of the samples sent over time, feedback applied and dropped, the reward
estimated per alpha bin), ``data_wait.png`` and ``report.html``, which shows them
with the config and the final table, and, when the run logged samples
(``logging.sample_every``, ``<run_dir>/samples/``), a grid of them per logged step, newest
first: each image with its caption, alpha, producer, age, score and source key. W&B draws
the same curves and table from its own run; this is for runs without it (offline clusters,
CI), so nothing here imports wandb.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
from pathlib import Path

from edsam_online.metrics import SAMPLES_DIR, read_jsonl
from edsam_online.policy import bin_edges

PLOTS = ("losses.png", "eval.png", "buffer.png", "producer.png", "policy.png", "data_wait.png")
EVAL_PREFIXES = {"zero-shot top-1": "eval/zeroshot_top1/", "linear probe top-1": "eval/linear_probe/"}
SAMPLE_STEPS_SHOWN = 8  # the newest logged steps drawn as grids; samples.jsonl keeps them all


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of every record holding a finite ``key``."""
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
           and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, records: list[dict], keys: list[str], title: str, x: str = "step", xlabel: str = "trainer step"):
    drawn = False
    for key in keys:
        xs, ys = _series(records, key, x)
        if xs:  # evaluation has a few points: mark them
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=key.split("/", 1)[-1])
            drawn = True
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)


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


def logged_samples(run_dir: Path) -> dict[int, list[dict]]:
    """``samples/samples.jsonl`` by step (ascending), each step's rows in order; where a step
    was logged twice (a rerun after a crash) its last rows win, as its image files do."""
    path = run_dir / SAMPLES_DIR / "samples.jsonl"
    by_step: dict[int, dict[int, dict]] = {}
    for record in read_jsonl(path) if path.is_file() else []:
        by_step.setdefault(record["step"], {})[record["row"]] = record
    return {step: [rows[i] for i in sorted(rows)] for step, rows in sorted(by_step.items())}


def _sample_figure(record: dict, run_dir: Path, out: Path) -> str:
    src = Path(os.path.relpath(run_dir / record["image"], out)).as_posix()
    facts = [f"&alpha; {record['alpha']:+.2f}" if record.get("alpha") is not None else None,
             html.escape(record["producer"]) if record.get("producer") else None,
             f"age {record['age_steps']}" if record.get("age_steps") is not None else None,
             f"score {record['score']:.2f}" if record.get("score") is not None else None]
    return (f'<figure><img src="{html.escape(src)}" alt="sample"><figcaption>{html.escape(record["caption"])}'
            f'<br><small>{" &middot; ".join(f for f in facts if f)}<br>'
            f'<code>{html.escape(record["source_key"])}</code></small></figcaption></figure>')


def _samples_section(run_dir: Path, out: Path) -> str:
    samples = logged_samples(run_dir)
    if not samples:
        return ""
    steps = sorted(samples, reverse=True)[:SAMPLE_STEPS_SHOWN]
    more = len(samples) - len(steps)
    parts = ["<h2>Training samples</h2><p>Extra-batch rows trainer rank 0 trained on, as trained "
             "(after the training transform), newest step first; age = trainer steps since the replay "
             f"buffer took the sample in.{f' {more} earlier steps are in samples/samples.jsonl.' if more else ''}</p>"]
    for step in steps:
        figures = "".join(_sample_figure(r, run_dir, out) for r in samples[step])
        parts.append(f'<h3>step {step}</h3><div class="grid">{figures}</div>')
    return "\n".join(parts)


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write every plot and ``report.html``; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    trainer_log = run_dir / "metrics" / "trainer0.jsonl"
    if not trainer_log.is_file():
        raise FileNotFoundError(f"{trainer_log} not found: is {run_dir} a run folder?")
    records = read_jsonl(trainer_log)
    producers = {p.stem: read_jsonl(p) for p in sorted((run_dir / "metrics").glob("producer*.jsonl"))}
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, records, ["train/loss", "train/loss_real", "train/loss_extra"], "losses (Eq. 11)")
    scale = ax.twinx()
    xs, ys = _series(records, "train/logit_scale")
    scale.plot(xs, ys, "k--", linewidth=0.8)
    scale.set_ylabel("logit scale (dashed)")
    _save(fig, out / "losses.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, prefix) in zip(axes, EVAL_PREFIXES.items()):
        keys = sorted({k for r in records for k in r if k.startswith(prefix) and not k.endswith("/source")})
        _line(ax, records, keys, name)
    _save(fig, out / "eval.png")

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    _line(axes[0, 0], records, ["buffer/fill"], "buffer fill")
    _line(axes[0, 1], records, ["buffer/inserts_per_s", "buffer/samples_per_s"], "inserts/s and samples/s")
    hist = [f"buffer/reuse_hist/{i}" for i in range(8)] + ["buffer/reuse_hist/ge8"]
    last = {k: v for r in records for k, v in r.items() if k in hist}
    axes[1, 0].bar([k.rsplit("/", 1)[1] for k in hist], [last.get(k, 0) for k in hist])
    axes[1, 0].set_title("uses per item at removal (last record)")
    _line(axes[1, 1], records, ["buffer/sample_age_steps_mean", "buffer/sample_age_steps_p90"], "sample age (steps)")
    _save(fig, out / "buffer.png")

    _producer_figure(producers, out)
    _policy_figure(producers, _resolved_config(run_dir), out)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    _line(ax, records, ["train/data_wait_frac"], "share of step time waiting for data")
    _save(fig, out / "data_wait.png")

    (out / "report.html").write_text(_page(run_dir, out, records), encoding="utf-8")
    return out / "report.html"


def _producer_figure(producers: dict[str, list[dict]], out: Path) -> None:
    """``producer.png``: samples/s and send-blocked time per producer."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, recs in producers.items():
        for ax, key in zip(axes, ("producer/samples_per_s", "producer/send_blocked_s")):
            xs, ys = _series(recs, key)
            ax.plot(xs, ys, label=name)
    for ax, title in zip(axes, ("producer samples/s", "producer send-blocked time (s, total)")):
        ax.set_title(title)
        ax.set_xlabel("samples sent")
        if producers:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no producer in this run", ha="center", va="center", transform=ax.transAxes)
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


def _policy_figure(producers: dict[str, list[dict]], config: dict, out: Path) -> None:
    """``policy.png``: for ``producer.policy=adversarial``, the alpha histogram of the samples
    sent over time (one column per record of the first steered producer), each steered
    producer's feedback applied and dropped, and the reward it estimates per alpha bin at
    the end."""
    import matplotlib.pyplot as plt

    steered = {name: recs for name, recs in producers.items() if any("policy/sent/00" in r for r in recs)}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if not steered:
        for ax in axes:
            ax.text(0.5, 0.5, "no steered producer in this run (producer.policy=uniform)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
            ax.set_axis_off()
        _save(fig, out / "policy.png")
        return
    name, recs = next(iter(steered.items()))
    sent, grid = alpha_histogram(recs)
    bins = len(grid)
    rho = float(config.get("diffusion", {}).get("rho", 1.0))
    shown = axes[0].imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                           extent=(sent[0], max(sent[-1], sent[0] + 1), -rho, rho))
    fig.colorbar(shown, ax=axes[0], label="share of samples sent")
    axes[0].set_title(f"alpha of the samples sent ({name})")
    axes[0].set_xlabel("samples sent")
    axes[0].set_ylabel("alpha")
    for label, recs_ in steered.items():
        xs, ys = _series(recs_, "feedback/applied", x="producer/sent")
        axes[1].plot(xs, ys, "-", label=f"{label} applied")
        dropped = [r for r in recs_ if "feedback/applied" in r and "producer/sent" in r]
        axes[1].plot([r["producer/sent"] for r in dropped],
                     [sum(v for k, v in r.items() if k.startswith("feedback/dropped/")) for r in dropped], ":",
                     label=f"{label} dropped (all reasons)")
        last = recs_[-1]
        edges = bin_edges(rho, bins)
        axes[2].plot((edges[:-1] + edges[1:]) / 2, [last.get(f"policy/reward/{k:02d}", math.nan) for k in range(bins)], "o-", label=label)
    axes[1].set_title("feedback entries")
    axes[1].set_xlabel("samples sent")
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


def _page(run_dir: Path, out: Path, records: list[dict]) -> str:
    """``report.html``: the final table, the logged samples, every plot and the run's config."""
    config = run_dir / "hydra" / "config.yaml"
    rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{_pct(z)}</td><td>{_pct(p)}</td></tr>"
                   for d, z, p in final_table(records))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edsam-online run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:2px 10px;text-align:right}}
img{{max-width:100%}}pre{{background:#f4f4f4;padding:8px;overflow:auto;max-height:400px}}
.grid{{display:flex;flex-wrap:wrap;gap:6px}}figure{{margin:0;width:128px;font-size:11px;line-height:1.25}}
figure img{{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;display:block}}</style></head><body>
<h1>Run {html.escape(str(run_dir))}</h1>
<h2>Final evaluation (top-1, %)</h2>
<table><tr><th>domain</th><th>zero-shot</th><th>linear probe</th></tr>{rows}</table>
{_samples_section(run_dir, out)}
{"".join(f'<h2>{html.escape(p[:-4].replace("_", " "))}</h2><img src="{p}">' for p in PLOTS)}
<h2>Config</h2><pre>{html.escape(config.read_text() if config.is_file() else "(no hydra/config.yaml in this run)")}</pre>
</body></html>
"""
    return page


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edsam-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder (scripts/launch.sh --run-dir, or runs/<time>)")
    p.add_argument("--out", help="where to write (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        print(render(args.run_dir, args.out))
    except FileNotFoundError as err:
        print(f"edsam-report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
