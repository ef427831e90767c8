"""From the demo to a real run: a user's own webdataset, generator folder and CLIP, through
``scripts/launch.sh experiment=sd_1gpu`` on CPU (tiny stand-ins of the preset's architectures),
and every command the docs show parses as written."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script
from _user_data import COLORS, SHAPES, tiny_sd_folder, tiny_vit_b32, write_imagefolder, write_shards
from test_trainer_dist import _env

from edsam_online.cli import quote_brace_patterns
from edsam_online.metrics import read_jsonl
from edsam_online.preflight import PreflightError, compose_checked
from edsam_online.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]

CPU_STAND_INS = [*load_script("bench/gpu_check.py").SD_1GPU_ON_CPU, "checkpoint.every=0", "logging.wandb=false",
                 "logging.log_every=2", "logging.sample_every=4"]


def test_sd_1gpu_runs_end_to_end_on_a_users_webdataset(tmp_path):
    pattern = write_shards(tmp_path / "shards", n=240, shards=2)
    val = write_imagefolder(tmp_path / "val", per_class=4)
    sd = tiny_sd_folder(tmp_path / "sd")
    clip = tiny_vit_b32(tmp_path / "clip")  # local-dir:<folder>
    run_dir = tmp_path / "run"
    steps = 8
    cmd = ["bash", "scripts/launch.sh", "--base-port", str(free_port()), "--run-dir", str(run_dir),
           "experiment=sd_1gpu", f"diffusion.model={sd}", f"data.path={pattern}", f"+eval.imagefolders.val={val}",
           f"model.name={clip}", *CPU_STAND_INS, f"trainer.steps={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    records = read_jsonl(run_dir / "metrics" / "trainer0.jsonl")
    assert max(r["step"] for r in records) == steps
    last = {k: v for r in records for k, v in r.items()}
    assert last["buffer/accepted"] > 0 and last["train/extra_samples"] > 0, out[-4000:]  # it trained on generated samples
    assert "eval/zeroshot_top1/val" in last  # the user's evaluation set, in its table
    assert re.search(r"\|\s*val\s*\|", out), out[-3000:]
    assert (run_dir / "checkpoints").is_dir() and list((run_dir / "checkpoints").glob("step_*.pt"))
    config = (run_dir / "hydra" / "config.yaml").read_text()
    assert f"name: {clip}" in config
    assert "config warning" not in out  # a real generator, a real CLIP and the user's own evaluation set


def _documented_commands() -> list[tuple[str, str]]:
    """(where, command) of every launch.sh / trainer / producer / edsam-eval command in the README,
    docs, launch.sh's and the entry points' help and the configs' comments, joined across line
    continuations."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scripts" / "launch.sh",
               *sorted((ROOT / "configs").rglob("*.yaml")), *sorted((ROOT / "consumers").glob("*.py")),
               *sorted((ROOT / "producers").glob("*.py"))]  # the entry points' --help
    found = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":  # fenced blocks line by line, inline code spans across line breaks
            blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
            spans = [" ".join(s.split()) for s in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", re.sub(r"```.*?```", "", text,
                                                                                                flags=re.S))]
            candidates = "\n".join(blocks).replace("\\\n", " ").splitlines() + spans
        else:  # comments, and the lines of a docstring that start with a command
            lines = [re.sub(r"^\s*#\s?", "", line).strip().removesuffix('"""') for line in text.splitlines()]
            candidates = "\n".join(lines).replace("\\\n", " ").splitlines()
            if path.suffix == ".py":
                candidates = [c for c in candidates if re.match(r"(scripts/|python -m |torchrun |edsam-)", c)]
        for line in candidates:
            match = re.search(r"(scripts/launch\.sh|python -m consumers\.(?:train|evaluate)|python -m producers"
                              r"(?:\.prepare)?|edsam-train|edsam-produce|edsam-prepare|edsam-eval)\b(.*)", line)
            rest = match.group(2) if match else ""
            if match and "..." not in rest and "OVERRIDES" not in rest and not rest.lstrip().startswith("("):
                found.append((f"{path.relative_to(ROOT)}", match.group(0).strip().strip("`")))
    return found


def _overrides(command: str) -> list[str]:
    """The Hydra overrides a shell passes (quotes removed, comments dropped), launch.sh's options
    and their values skipped; with launch.sh, its embedded experiment first unless one is named."""
    # <time>, <run>: a placeholder the reader fills in
    words = shlex.split(re.sub(r"<[\w -]+>", "PLACEHOLDER", command.split("`")[0]), comments=True)
    valued = {"--producers", "--trainers", "--producer-devices", "--trainer-devices", "--nnodes", "--node-rank",
              "--rdzv-endpoint", "--base-port", "--run-dir", "--producer-restarts", "--curve-keys", "--cfg"}
    out, skip = [], False
    for word in words[1:]:
        if skip or word.startswith("-"):
            skip = word in valued
            continue
        if "=" in word or word.startswith("~"):
            out.append(word)
    if words[0].endswith("launch.sh") and not any(re.match(r"^\+{0,2}experiment=|^~experiment", o) for o in out):
        out.insert(0, "experiment=cpu_demo")
    return out


DOCUMENTED = _documented_commands()


def test_the_docs_show_commands_to_check():
    where = {w for w, _ in DOCUMENTED}
    assert {"README.md", "docs/recipes.md", "scripts/launch.sh", "configs/experiment/sd_1gpu.yaml"} <= where
    assert any("{00000..00331}" in c for _, c in DOCUMENTED)  # the CC3M brace pattern, as shown


@pytest.mark.parametrize("where,command", DOCUMENTED, ids=[f"{w}:{c[:60]}" for w, c in DOCUMENTED])
def test_every_documented_command_composes_as_written(where, command):
    """Keys, values and syntax hold as shown (paths are the reader's: they are not checked here)."""
    overrides = quote_brace_patterns(_overrides(command))
    if "edsam-eval" in command or "consumers.evaluate" in command:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from consumers.evaluation import EvaluateConfig  # registers its schema

        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("evaluate", overrides=overrides)  # keys and types; its paths are the reader's
        assert OmegaConf.get_type(cfg) is EvaluateConfig
        return
    try:
        compose_checked(overrides)
    except PreflightError as err:
        pytest.fail(f"{where}: {command}\n  -> {err}")


def test_the_sample_grid_shows_a_users_own_images_beside_their_samples(tmp_path):
    """scripts/sample_grid.py on the user's shards: each of the user's images, in shard order, in
    the first column with its caption, its transported samples beside it (the tiny random
    generator here)."""
    pattern = write_shards(tmp_path / "shards", n=6, shards=1, size=48)
    out = tmp_path / "grid.png"
    rows, m = 3, 2
    fig = load_script("scripts/sample_grid.py").main(
        ["--out", str(out), "--model", "tiny-random", "--resolution", "32", "--rows", str(rows), "--m", str(m),
         "--steps", "2", "--batch-size", "4", "--data-kind", "webdataset", "--data-path", pattern])
    assert out.stat().st_size > 0
    for i in range(rows):  # write_shards' image i: SHAPES[i % 3] in color (i // 3) % 3, centred
        shape, color = SHAPES[i % 3], list(COLORS)[(i // 3) % 3]
        real = fig.axes[i * (m + 1)]
        assert real.get_ylabel() == f"a photo of a {color} {shape}"
        pixels = np.asarray(real.images[0].get_array())
        assert pixels.shape == (32, 32, 3)
        assert np.abs(pixels[16, 16].astype(int) - COLORS[color]).max() < 40, pixels[16, 16]
        assert all(fig.axes[i * (m + 1) + 1 + j].images for j in range(m))  # its samples beside it
