"""Draw the samples table an offline W&B run logged (``samples/extra``), read back from the run
folder's transaction log and W&B's staged table files, as one PNG laid out as the table: each
row's image, its source image's thumbnail (where its producer sent one), caption, alpha,
producer, age, source key and score. It shows what the run holds;
it is not a picture of the W&B UI.

    python scripts/wandb_samples.py RUN_DIR --out docs/wandb_samples.png [--step S] [--rows 12]

RUN_DIR is a run folder (its ``wandb/offline-run-*``) or an offline run folder itself.
"""

import argparse
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from edsam_online.metrics import SAMPLES_KEY  # noqa: E402
from edsam_online.wandb_offline import read_run, read_table  # noqa: E402


def _offline_folder(path: Path) -> Path:
    if any(path.glob("*.wandb")):
        return path
    folders = sorted((path / "wandb").glob("offline-run-*"))
    if not folders:
        raise FileNotFoundError(f"no offline W&B run in {path} (expected {path}/wandb/offline-run-*)")
    return folders[-1]


# column -> (x position as a share of the figure's width, how its value is written)
_COLUMNS = {
    "caption": (0.145, lambda v: textwrap.fill(str(v), 52)),  # the longest templates run into alpha
    "alpha": (0.49, lambda v: f"{v:+.3f}"),
    "producer": (0.56, str),
    "age_steps": (0.67, str),
    "source_key": (0.75, str),
    "score": (0.925, lambda v: f"{v:.3f}"),
}
_IMAGES = {"image": 0.01, "source": 0.075}  # image columns -> x position


def _draw(rows: list[dict], title: str, out: str) -> None:
    """The table as W&B lays it out: one line per row, the images first, then the columns."""
    line_in, head_in, width_in = 0.62, 0.9, 10.0
    height_in = head_in + line_in * len(rows) + 0.1
    fig = plt.figure(figsize=(width_in, height_in))
    fig.text(0.01, 1 - 0.2 / height_in, title, fontsize=8.5, va="top")
    y_head = 1 - (head_in - 0.12) / height_in
    for name, x in _IMAGES.items():
        fig.text(x, y_head, name, fontsize=8, weight="bold", va="center")
    for name, (x, _) in _COLUMNS.items():
        fig.text(x, y_head, name, fontsize=8, weight="bold", va="center")
    for i, row in enumerate(rows):
        top = 1 - (head_in + line_in * i) / height_in
        size = (line_in - 0.06) / height_in
        for name, x in _IMAGES.items():
            if row.get(name) is None:  # a sample without a source thumbnail
                continue
            ax = fig.add_axes((x, top - size - 0.03 / height_in, size * height_in / width_in, size))
            with Image.open(row[name]) as image:
                ax.imshow(image.convert("RGB"), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        y = top - line_in / 2 / height_in
        for name, (x, fmt) in _COLUMNS.items():
            value = row.get(name)
            fig.text(x, y, "-" if value is None else fmt(value), fontsize=8, va="center",
                     family="monospace" if name == "source_key" else None)
        fig.add_artist(plt.Line2D([0.01, 0.99], [top, top], color="0.85", linewidth=0.6))
    fig.savefig(out, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--step", type=int, help="the table logged at this step (default: the last)")
    p.add_argument("--rows", type=int, default=12, help="table rows drawn")
    a = p.parse_args(argv)
    folder = _offline_folder(a.run_dir)
    run = read_run(folder)
    tables = read_table(run, SAMPLES_KEY)
    if a.step is not None:
        tables = [t for t in tables if t.step == a.step]
    if not tables:
        print(f"no {SAMPLES_KEY} table{'' if a.step is None else f' at step {a.step}'} in {folder}", file=sys.stderr)
        return 2
    table = tables[-1]
    rows = table.rows[:a.rows]
    _draw(rows, f"W&B table '{SAMPLES_KEY}' at trainer step {table.step} of run {run.name} (group {run.group}): "
          f"{len(rows)} of its {len(table.rows)} rows\nread back from the offline run folder {folder.name} and "
          "drawn with matplotlib (not a screenshot of the W&B UI)", a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
