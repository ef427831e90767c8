"""The library Trainer in one process: its step under the GPU switches, its hook, its teardown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from edsam_online.config import load_config
from edsam_online.eval import EvalConfig
from edsam_online.loader import MixedBatch
from edsam_online.runtime import free_port
from edsam_online.methods import Augmentation
from edsam_online.metrics import read_jsonl
from edsam_online.trainer import EVAL_TABLE_COLUMNS, EVAL_TABLE_KEY, Trainer, eval_table
from edsam_online.wandb_offline import read_run, read_table, records


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _trainer(tmp_path, augmentation=None, **groups) -> Trainer:
    tree = {
        "stream": {"endpoints": [f"tcp://127.0.0.1:{free_port()}"]},  # no producer
        "trainer": {"batch_size": 4, "steps": 10, "progress": False},
        "mix": {"extra_share": 0.5, "extra_wait_s": 0.0},
        "runtime": {"device": "cpu", "num_workers": 1, "prefetch": 1},
        "data": {"length": 64},
        "eval": {"domains": ["flat"], "samples_per_class": 2, "linear_probe": False},
        "logging": {"wandb": False},
        "run_dir": str(tmp_path / "run"),
    }
    for group, values in groups.items():
        tree.setdefault(group, {}).update(values)
    return Trainer(load_config(tree), augmentation=augmentation)


def _batch(trainer: Trainer) -> MixedBatch:
    texts = trainer.tokenizer([f"a small shape number {i}" for i in range(6)])
    return MixedBatch(torch.rand(4, 3, 32, 32), texts[:4], list("abcd"), torch.rand(2, 3, 32, 32), texts[4:],
                      ["e", "f"], torch.tensor([True, False]), torch.tensor([0.1, float("nan")]))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_step_under_autocast_and_channels_last_is_finite_and_trains_both_terms(tmp_path, precision):
    with _trainer(tmp_path, runtime={"precision": precision, "channels_last": True}) as trainer:
        assert (trainer.scaler is not None) == (precision == "fp16")
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = trainer.train_step(_batch(trainer))
        assert torch.isfinite(out.loss) and out.loss_extra > 0 and out.used_extra
        assert (out.num_real, out.num_genuine, trainer.step) == (4, 1, 1)
        after = list(trainer.model.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(after, before))
        assert all(p.grad is None for p in after)  # no gradient memory held between steps


class _Flip(Augmentation):
    """A method that supplies the extra batch itself: horizontally flipped real images."""

    def __call__(self, batch: MixedBatch, trainer: Trainer) -> MixedBatch:
        n = batch.extra_images.shape[0]
        batch.extra_images = batch.real_images[:n].flip(-1)
        batch.extra_texts = batch.real_texts[:n]
        batch.extra_genuine = torch.ones(n, dtype=torch.bool)
        return batch


def test_an_augmentation_supplies_the_extra_batch_of_a_step(tmp_path):
    with _trainer(tmp_path, augmentation=_Flip()) as trainer:
        batch = _batch(trainer)
        batch.extra_genuine[:] = False  # as the loader makes it when the buffer is dry
        assert trainer.train_step(batch).num_genuine == 2
    with _trainer(tmp_path) as trainer:
        batch = _batch(trainer)
        batch.extra_genuine[:] = False
        out = trainer.train_step(batch)
        assert (out.num_genuine, out.used_extra, float(out.loss_extra)) == (0, False, 0.0)  # the real term alone


def test_teardown_runs_when_training_fails(tmp_path):
    class _Broken(Augmentation):
        def __call__(self, batch, trainer):
            raise RuntimeError("boom")

    trainer = _trainer(tmp_path, augmentation=_Broken(), buffer={"min_size_to_sample": 1})
    assert trainer.receiver.is_alive()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not trainer.receiver.is_alive()
    trainer.buffer.insert("an item")
    assert trainer.buffer.sample(0) is None  # closed: an open buffer would serve it (min size 1)
    assert trainer.logger._file is None  # the metrics file is closed


EVAL_KEY = "eval/zeroshot_top1/flat"


def test_a_real_only_trainer_has_no_stream_and_logs_progress_eval_table_and_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    logging = {"wandb": True, "wandb_mode": "offline", "wandb_checkpoint": True, "progress_every": 4}
    with _trainer(tmp_path, mix={"extra_share": 0.0}, trainer={"progress": True}, logging=logging) as trainer:
        assert trainer.buffer is None and trainer.receiver is None and trainer.extra_batch == 0
        metrics = trainer.train()
    assert trainer.step == 10
    (logged,) = [r for r in read_jsonl(tmp_path / "run" / "metrics" / "trainer0.jsonl") if EVAL_KEY in r]
    assert logged["step"] == 10 and {k: logged[k] for k in metrics} == metrics  # the evaluation it logged
    trained = [r for r in read_jsonl(tmp_path / "run" / "metrics" / "trainer0.jsonl") if "train/loss" in r]
    assert all(0 < r["memory/malloc_in_use_mib"] <= r["memory/malloc_held_mib"] < r["memory/rss_mib"]
               for r in trained)  # glibc (Linux CI)
    count = metrics["eval/count/flat"]  # 2 images per class of 10: the accuracy is a share of them
    assert count == 20 and metrics[EVAL_KEY] * count == pytest.approx(round(metrics[EVAL_KEY] * count))
    err = capsys.readouterr().err  # not a terminal: whole lines, no tqdm bar
    assert "\r" not in err
    assert [line.split(" | ")[0] for line in err.splitlines() if line.startswith("[train]")] == [
        "[train] step 4/10 (40%)", "[train] step 8/10 (80%)", "[train] step 10/10 (100%)"]
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (table,) = read_table(read_run(folder), EVAL_TABLE_KEY)
    assert table.step == 10 and table.columns == list(EVAL_TABLE_COLUMNS)
    assert [(r["set"], r["zeroshot_top1"], r["linear_probe_top1"]) for r in table.rows] == [
        ("flat", metrics["eval/zeroshot_top1/flat"], None)]
    (model,) = [r.artifact for r in records(folder) if r.WhichOneof("record_type") == "artifact"
                and r.artifact.type == "model"]
    assert [Path(c.local_path).name for c in model.manifest.contents] == ["step_00000010.pt"]


def test_the_eval_table_has_a_row_per_set_with_both_accuracies_and_an_example():
    metrics = {"eval/zeroshot_top1/flat": 0.5, "eval/zeroshot_top1/source": 0.5, "eval/zeroshot_top1/sketch": 0.25,
               "eval/zeroshot_top1/target_mean": 0.25, "eval/linear_probe/flat": 0.75, "eval/linear_probe/mine": 0.1}
    rows = eval_table(metrics, EvalConfig(resolution=16))
    assert [row[:3] for row in rows] == [["flat", 0.5, 0.75], ["sketch", 0.25, None], ["target_mean", 0.25, None],
                                         ["mine", None, 0.1]]  # "source" repeats the source domain: no row
    assert rows[0][3].shape == (16, 16, 3) and rows[0][3].dtype == np.uint8 and rows[2][3] is None


def test_logged_samples_carry_their_source_thumbnail(tmp_path):
    thumb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    with _trainer(tmp_path, logging={"sample_every": 1}) as trainer:
        batch = _batch(trainer)
        batch.extra_genuine = torch.tensor([True, True])
        batch.extra_source_thumbs = [thumb, None]  # the second one's producer sent none
        trainer.train_step(batch)
    samples = tmp_path / "run" / "samples"
    records = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    assert [(r["source_key"], r["source_image"]) for r in records] == [("e", "step_00000001/00_source.png"),
                                                                      ("f", None)]
    with Image.open(samples / records[0]["source_image"]) as png:
        assert np.array_equal(np.asarray(png), thumb)


def test_synthetic_rows_weigh_by_their_score_and_the_scores_are_logged(tmp_path):
    from edsam_online.trainer import _Window

    with _trainer(tmp_path, loss={"extra_weighting": "score"}) as trainer:
        batch = _batch(trainer)
        batch.extra_genuine[:] = True
        with torch.no_grad():
            def loss_extra(score):
                batch.extra_score = score
                return trainer.forward_loss(batch, True)[0]["loss_extra"]

            plain = loss_extra(None)  # no scores: every row weighs 1
            torch.testing.assert_close(loss_extra(torch.tensor([0.5, 0.5])), plain)  # equal weights: the plain mean
            assert not torch.allclose(loss_extra(torch.tensor([0.0, float("nan")])), plain)  # row e drops out
        out = trainer.train_step(batch)
    assert (out.extra_scores, out.extra_unscored) == ([0.0], 1)
    window = _Window()
    window.add(out, 6, 1.0, 0.0)
    assert window.score_metrics() == {"buffer/score_missing_share": 0.5, "buffer/score_mean": 0.0,
                                      "buffer/score_p10": 0.0, "buffer/score_p50": 0.0, "buffer/score_p90": 0.0}
    with pytest.raises(ValueError, match="^loss.extra_weighting: score needs kind=clip"):
        load_config({"loss": {"extra_weighting": "score", "kind": "siglip"}})


def test_a_step_reports_each_generated_rows_own_loss_to_the_producer_that_asked(tmp_path):
    import zmq

    from edsam_online.feedback import decode_feedback
    from edsam_online.loader import Origin

    ctx = zmq.Context()
    producer = ctx.socket(zmq.PULL)
    producer.linger = 0
    port = producer.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        with _trainer(tmp_path, feedback={"every_steps": 2}) as trainer:
            for step in range(2):
                batch = _batch(trainer)
                batch.extra_genuine = torch.tensor([True, True])
                batch.extra_origins = [Origin(77, 10 + step, endpoint), None]  # the second asked for nothing
                trainer.train_step(batch)
                assert trainer.feedback is not None
            assert producer.poll(5000)
            fb = decode_feedback(producer.recv(), 4096)
            assert (fb.session, fb.seq.tolist(), fb.model_step.tolist(), fb.step) == (77, [10, 11], [0, 1], 2)
            assert all(0 < loss < 10 for loss in fb.loss.tolist())  # InfoNCE over 2 rows: around log 2
            assert trainer.feedback.metrics()["feedback/entries_sent"] == 2
    finally:
        ctx.destroy(linger=0)
