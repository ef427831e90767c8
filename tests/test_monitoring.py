"""What people look at: the samples a trainer logs (W&B table, PNG files and JSONL), the
W&B step axes, run config and group, read back from the offline run a short run leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms

from edsam_online.config import load_config
from edsam_online.diffusion import GeneratedBatch
from edsam_online.loader import MixedBatch
from edsam_online.metrics import SAMPLE_COLUMNS, SAMPLE_FIELDS, SAMPLES_KEY, LoggingConfig, MetricLogger, read_jsonl
from edsam_online.trainer import _normalization, sample_rows
from edsam_online.wandb_offline import read_run, read_table
from edsam_online.wire import encode_message

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a small red star on a light background", "a large blue ring on a light background"]


def _thumb(source: int) -> np.ndarray:
    return np.full((8, 8, 3), 40 * source, np.uint8)


def _frames(seq: int) -> list:
    """One scored sample from "producer-7", as a producer sends it, with its source's thumbnail
    and forwarded stats."""
    image = np.random.default_rng(seq).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = GeneratedBatch.single(image, f"src{seq % 5}", CAPTIONS[seq % 2], alpha=0.25 + seq % 3 / 10, seed=seq,
                                  model_id="test", rho=0.5).scored(np.array([0.5 + seq % 2 / 4]))
    batch.source_thumbs = _thumb(seq % 5)[None]
    return encode_message(batch, "producer-7", 1, seq, stats={"producer/sent": float(seq + 1),
                                                              "producer/samples_per_s": 5.0})


def _feed(stop: threading.Event) -> str:
    """A producer stand-in bound on loopback, sending until ``stop``; returns its endpoint."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")

    def run():
        seq = 0
        while not stop.is_set():
            try:
                sock.send_multipart(_frames(seq), flags=zmq.NOBLOCK, copy=False)
                seq += 1
            except zmq.Again:
                pass
            stop.wait(0.02)
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return sock.last_endpoint.decode()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short ``python -m consumers.train`` run (8 steps, samples every 4) fed by a stand-in
    producer, W&B offline (the logger keeps W&B's staging inside the run folder)."""
    tmp = tmp_path_factory.mktemp("monitoring")
    stop = threading.Event()
    endpoint = _feed(stop)
    run_dir = tmp / "run"
    overrides = ["trainer.steps=8", "trainer.batch_size=4", "trainer.progress=false", "data.length=64",
                 f"stream.endpoints=[{endpoint}]", "buffer.min_size_to_sample=4", "mix.extra_wait_s=2.0",
                 "runtime.num_workers=1", "runtime.prefetch=1", "runtime.threads=1", "eval.domains=[flat]",
                 "eval.samples_per_class=2", "eval.linear_probe=false", "logging.log_every=4",
                 "logging.sample_every=4", "logging.sample_rows=3", f"run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    try:
        out = subprocess.run([sys.executable, "-m", "consumers.train", *overrides], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    return run_dir, read_run(folder)


def test_the_offline_wandb_run_holds_the_sample_table_with_images_captions_and_alpha(trained_run):
    _, run = trained_run
    tables = read_table(run, SAMPLES_KEY)
    assert [t.step for t in tables] == [4, 8]  # every sample_every steps; 8 is also the last
    for table in tables:
        assert table.columns == list(SAMPLE_COLUMNS)
        assert len(table.rows) == 3  # logging.sample_rows
        for row in table.rows:
            assert row["caption"] in CAPTIONS and row["alpha"] in (0.25, 0.35, 0.45)
            assert row["producer"] == "producer-7" and row["score"] in (0.5, 0.75)
            assert row["source_key"].startswith("src") and 0 <= row["age_steps"] <= table.step
            with Image.open(row["image"]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
            with Image.open(row["source"]) as source:  # the thumbnail its producer sent with it
                assert np.array_equal(np.asarray(source), _thumb(int(row["source_key"][3:])))
            assert row["image"].is_relative_to(trained_run[0]) and row["source"].is_relative_to(trained_run[0])


def test_the_run_folder_holds_the_same_samples_as_png_files_and_jsonl(trained_run):
    run_dir, run = trained_run
    records = read_jsonl(run_dir / "samples" / "samples.jsonl")
    assert [(r["step"], r["row"]) for r in records] == [(4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (8, 2)]
    logged = [row for t in read_table(run, SAMPLES_KEY) for row in t.rows]
    for record, row in zip(records, logged):  # the same rows, in the same order
        assert {k: record[k] for k in SAMPLE_FIELDS} == {k: row[k] for k in SAMPLE_FIELDS}
        assert record["image"] == f"samples/step_{record['step']:08d}/{record['row']:02d}.png"
        assert record["source_image"] == f"step_{record['step']:08d}/{record['row']:02d}_source.png"
        with Image.open(run_dir / record["image"]) as png, Image.open(row["image"]) as staged:
            assert np.array_equal(np.asarray(png), np.asarray(staged))  # the same pixels in both
        with Image.open(run_dir / "samples" / record["source_image"]) as png, Image.open(row["source"]) as staged:
            assert np.array_equal(np.asarray(png), np.asarray(staged))


def test_the_step_axes_config_and_group_of_the_trainer_run(trained_run):
    run_dir, run = trained_run
    for name in ("train/loss", "buffer/fill", "eval/zeroshot_top1/flat", "data/corrupt_skipped", SAMPLES_KEY):
        assert run.step_metric(name) == "trainer/step", name
    assert run.step_metric("producer/samples_per_s") == "producer/sent"
    assert run.step_metric("trainer/step") is None and run.step_metric("producer/sent") is None
    logged = [h for h in run.history if "train/loss" in h]
    assert [h["trainer/step"] for h in logged] == [4, 8]
    assert all(h["producer/sent"] > 0 for h in logged)  # forwarded in headers, the x axis of producer/*
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / "hydra" / "config.yaml"), resolve=True)
    assert run.config == resolved  # what consumers.train composed, every key
    assert run.config["logging"]["sample_every"] == 4
    assert (run.group, run.job_type, run.name) == ("run", "trainer", "run-trainer0")


def test_the_docs_figure_draws_the_table_the_offline_run_holds(trained_run, tmp_path, capsys):
    script = load_script("scripts/wandb_samples.py")
    run_dir, _ = trained_run
    assert script.main([str(run_dir), "--out", str(tmp_path / "table.png"), "--step", "4"]) == 0
    with Image.open(tmp_path / "table.png") as png:
        assert png.width == 1000 and png.height > 3 * 62  # a header and three rows of 0.62 in at 100 dpi
    assert script.main([str(run_dir), "--out", str(tmp_path / "none.png"), "--step", "5"]) == 2
    assert "no samples/extra table at step 5" in capsys.readouterr().err


def test_producer_and_trainer_runs_of_one_launch_share_a_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "exp1"
    cfg = LoggingConfig(wandb_mode="offline", wandb_all_ranks=True)
    # launch.sh gives every role the same run_dir; a producer may see it relative, a trainer absolute
    producer = MetricLogger(cfg, "runs/exp1/", role="producer", rank=0)
    producer.log({"producer/sent": 8, "producer/samples_per_s": 2.0}, step=8)
    producer.close()
    trainer = MetricLogger(cfg, run_dir, role="trainer", rank=0)
    trainer.close()
    runs = {r.job_type: r for r in map(read_run, (run_dir / "wandb").glob("offline-run-*"))}
    assert runs["producer"].group == runs["trainer"].group == "exp1"
    assert runs["producer"].step_metric("producer/samples_per_s") == "producer/sent"
    named = MetricLogger(LoggingConfig(wandb=False, group="sweep-a"), run_dir, role="producer")
    assert named.group == "sweep-a"  # logging.group, when set, names it for every role


class _Tokens:
    def __call__(self, texts):
        return torch.zeros(len(texts), 4, dtype=torch.long)


def test_sample_rows_are_the_trained_images_un_normalised_with_their_provenance():
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    mean, std = _normalization(transform)
    pixels = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(3)]
    syn = torch.stack([transform(Image.fromarray(p)) for p in pixels])
    batch = MixedBatch(syn[:1], _Tokens()(["x"]), ["r"], syn, _Tokens()(["a", "b", "c"]), ["k0", "k1", "k2"],
                       torch.tensor([True, False, True]), torch.tensor([0.1, float("nan"), -0.2]),
                       torch.tensor([0.9, float("nan"), float("nan")]), ["real"], ["cap a", "cap b", "cap c"],
                       ["producer-1", None, "producer-2"], [3, None, 10])
    rows = sample_rows(batch, limit=16, step=12, mean=mean, std=std)
    assert [r.source_key for r in rows] == ["k0", "k2"]  # the real fallback row is not a sample
    assert all(np.array_equal(r.image, pixels[i]) for r, i in zip(rows, (0, 2)))  # back to the exact uint8
    assert [(r.caption, r.producer, r.age_steps, r.score) for r in rows] == [
        ("cap a", "producer-1", 9, pytest.approx(0.9)), ("cap c", "producer-2", 2, None)]
    assert [r.alpha for r in rows] == [pytest.approx(0.1), pytest.approx(-0.2)]
    assert len(sample_rows(batch, limit=1, step=12, mean=mean, std=std)) == 1
    batch.extra_captions = batch.extra_producers = batch.extra_inserted_steps = []  # a batch built without provenance
    unknown = sample_rows(batch, 16, 12, mean, std)
    assert [(r.caption, r.producer, r.age_steps) for r in unknown] == [("", None, None)] * 2


@pytest.mark.parametrize("key,value,message", [("sample_every", -1, "logging.sample_every: must be >= 0"),
                                               ("sample_rows", 0, "logging.sample_rows: must be >= 1")])
def test_a_bad_sample_setting_stops_at_start_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        load_config({"logging": {key: value}})


def test_samples_are_written_without_wandb_and_nothing_when_off(tmp_path):
    from edsam_online.metrics import SampleRow

    row = SampleRow(np.zeros((4, 4, 3), np.uint8), "a caption", None, None, None, "k", None)
    logger = MetricLogger(LoggingConfig(wandb=False), tmp_path, role="trainer")
    logger.log_samples([row, row], step=7)
    logger.log_samples([], step=8)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == ["samples/step_00000007/00.png", "samples/step_00000007/01.png"]
    assert records[0]["alpha"] is None and records[0]["caption"] == "a caption"
    assert all((tmp_path / r["image"]).is_file() for r in records)
    quiet = MetricLogger(LoggingConfig(wandb=False, jsonl=False), tmp_path / "quiet", role="trainer")
    quiet.log_samples([row], step=1)
    assert not (tmp_path / "quiet" / "samples").exists()


# ----------------------------------------------------------------------------- buffer-monitor on a run folder


def _run_folder(tmp_path, records, steps=20, stop_at=0, method="edsam"):
    """A run folder as a trainer leaves it: ``hydra/config.yaml`` and ``metrics/trainer0.jsonl``."""
    (tmp_path / "hydra").mkdir()
    (tmp_path / "hydra" / "config.yaml").write_text(
        f"trainer:\n  steps: {steps}\n  stop_at: {stop_at}\nmethod:\n  name: {method}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "trainer0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _buffer_record(step, size):
    return {"step": step, "role": "trainer", "train/loss": 1.0, "buffer/size": size, "buffer/capacity": 64,
            "buffer/fill": size / 64}


@pytest.fixture
def no_sleep(monkeypatch):
    """buffer-monitor's waits, counted and skipped; a clock that each wait moves by its length."""
    from edsam_online import monitor

    clock = {"now": 0.0, "sleeps": 0}

    def sleep(seconds):
        clock["sleeps"] += 1
        assert clock["sleeps"] < 100, "buffer-monitor never stopped"
        clock["now"] += seconds

    monkeypatch.setattr(monitor, "sleep", sleep)
    monkeypatch.setattr(monitor, "monotonic", lambda: clock["now"])
    return clock


@pytest.mark.parametrize("steps,stop_at,end", [(20, 0, 20), (50, 20, 20)])
def test_buffer_monitor_stops_on_a_finished_run_with_a_final_line(tmp_path, capsys, no_sleep, steps, stop_at, end):
    from edsam_online import monitor

    run = _run_folder(tmp_path, [_buffer_record(10, 8), _buffer_record(20, 32), {"step": 20, "eval/top1": 0.5}],
                      steps=steps, stop_at=stop_at)
    assert monitor.main(["--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert no_sleep["sleeps"] == 0  # no second look at a run that has ended
    assert f"step 20/{end} @" in out and "size 32/64 (50%)" in out  # the trainer step, the last buffer state
    assert out.rstrip().splitlines()[-1].startswith(f"buffer-monitor: the run finished: its trainers logged step {end}")
    assert monitor.main(["--run-dir", str(run), "--json"]) == 0  # stdout stays JSON lines; the final line on stderr
    captured = capsys.readouterr()
    (record,) = map(json.loads, captured.out.splitlines())
    assert (record["buffer/size"], record["trainer/step"]) == (32, 20) and "the run finished" in captured.err


def test_buffer_monitor_follows_a_running_run_and_leaves_a_silent_one_after_idle_exit(tmp_path, capsys, no_sleep,
                                                                                      monkeypatch):
    from edsam_online import monitor

    run = _run_folder(tmp_path, [_buffer_record(10, 8)], steps=30)
    log = run / "metrics" / "trainer0.jsonl"
    real_sleep = monitor.sleep

    def sleep_and_log(seconds):  # the trainer logs step 20 during the first wait, then nothing
        if no_sleep["sleeps"] == 0:
            log.write_text(log.read_text() + json.dumps(_buffer_record(20, 16)) + "\n")
        real_sleep(seconds)

    monkeypatch.setattr(monitor, "sleep", sleep_and_log)
    assert monitor.main(["--jsonl", str(log), "--interval", "2", "--idle-exit", "5"]) == 0
    out = capsys.readouterr().out
    assert "step 10/30" in out and "step 20/30" in out and "size 16/64" in out and "finished" not in out
    assert out.rstrip().splitlines()[-1].startswith("buffer-monitor: nothing new for 5 s (--idle-exit)")
    assert no_sleep["sleeps"] == 4 and no_sleep["now"] == 8  # step 20 came at t=2; idle from then: 6 >= 5 at t=8


def test_buffer_monitor_says_a_run_without_a_buffer_has_none(tmp_path, capsys):
    from edsam_online import monitor

    run = _run_folder(tmp_path, [{"step": 10, "train/loss": 2.0}], method="none")
    assert monitor.main(["--run-dir", str(run), "--once"]) == 0
    out = capsys.readouterr().out
    assert "no buffer (method=none)" in out and "size 0/0" not in out and "step 10/20" in out
    (run / "metrics" / "trainer0.jsonl").write_text("")
    assert monitor.main(["--run-dir", str(run), "--once"]) == 0
    assert "no trainer record yet" in capsys.readouterr().out


def test_buffer_monitor_without_a_run_config_shows_the_step_and_never_calls_the_run_finished(tmp_path, capsys,
                                                                                          no_sleep):
    from edsam_online import monitor

    log = tmp_path / "trainer0.jsonl"
    log.write_text(json.dumps(_buffer_record(600, 64)) + "\n")
    assert monitor.read_run_info(tmp_path) == monitor.RunInfo(None, None)
    assert monitor.main(["--jsonl", str(log), "--idle-exit", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 600 @" in out and "finished" not in out and "--idle-exit" in out
    with pytest.raises(SystemExit):
        monitor.main(["--jsonl", str(log), "--idle-exit", "-1"])
    assert "--idle-exit must be >= 0" in capsys.readouterr().err
