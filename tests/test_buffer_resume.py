"""checkpoint.buffer: a trainer rank's replay buffer saved beside its checkpoint and restored on resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch.distributed as dist

from edsam_online import checkpoint as ckpt
from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.buffer_snapshot import read_snapshot
from edsam_online.diffusion import GeneratedBatch
from edsam_online.ledger import RESTORED_PREFIX, ledger
from edsam_online.wire import WireLimits, decode_message, encode_message

LIMITS = WireLimits()


def _message(seq: int, k: int = 4, m: int = 2, side: int = 8, encoding: str = "raw",
             feedback: str | None = "tcp://127.0.0.1:7000"):
    """A received message of ``k`` samples, ``m`` per source, with every optional field."""
    rng = np.random.default_rng(seq)
    u = k // m
    batch = GeneratedBatch(
        images=rng.integers(0, 256, (k, side, side, 3), dtype=np.uint8),
        source_keys=[f"src{seq}-{j}" for j in range(u)], captions=[f"a small red star number {seq}-{j}" for j in range(u)],
        source=np.repeat(np.arange(u), m), alpha=rng.uniform(-0.5, 0.5, k), seed=np.arange(k) + 100 * seq,
        sample_index=np.tile(np.arange(m), u), rho=0.5, model_id="test", mode="transport", steps=2, inversion_steps=2,
        guidance=1.0, score=rng.uniform(0, 1, k).astype(np.float32),
        source_thumbs=rng.integers(0, 256, (u, 4, 4, 3), dtype=np.uint8))
    frames = encode_message(batch, "producer-0", 77, 1000 + 10 * seq, stats={"producer/images": 3.0}, encoding=encoding,
                            feedback=feedback)
    return decode_message(frames, LIMITS, received_at=1.5e9 + seq)[1]


def _buffer(capacity=12, seed=0, **kw) -> ReplayBuffer:
    cfg = BufferConfig(capacity=capacity, min_size_to_sample=2, samples_per_insert=3.0, error_buffer=8.0, seed=seed, **kw)
    return ReplayBuffer(cfg, key=lambda s: s.source_key)


def _items(buf: ReplayBuffer) -> list:
    """Every item oldest first as plain values: image, what training reads, its provenance and
    source thumbnail, when it arrived, its uses and insert step."""
    snap = buf.snapshot()
    out = []
    for seq, i, uses, step in zip(snap.seqs, snap.index.tolist(), snap.uses.tolist(), snap.inserted_step.tolist()):
        s = seq[i]
        out.append((s.image.tobytes(), s.caption, s.source_key, s.alpha, s.score, s.header, s.source_thumb.tobytes(),
                    s.batch.received_at, uses, step))
    return out


def _filled(capacity=12, seed=0) -> ReplayBuffer:
    """A buffer whose live items are cut runs of several messages: partly evicted, holes from
    retirement, a JPEG one, reused."""
    buf = _buffer(capacity, seed, max_times_sampled=2)
    for seq in range(5):
        buf.set_step(seq)
        buf.insert_many(_message(seq, encoding="jpeg" if seq == 3 else "raw"))
        for _ in range(3):
            buf.sample(0)
    assert buf.stats()["buffer/retired"] > 0 and buf.stats()["buffer/evicted"] > 0
    return buf


def test_a_snapshot_file_restores_every_item_its_provenance_reuse_and_the_limiter_exactly(tmp_path):
    buf = _filled()
    path = ckpt.save_buffer_snapshot(tmp_path, 5, 0, buf)
    assert path == tmp_path / "checkpoints" / "step_00000005.buffer0.npz"
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert {name for name in data} >= {"meta", "pixels", "uses"}
    twin = _buffer()
    assert ckpt.restore_buffer_snapshots(path.with_name("step_00000005.pt"), twin, 0, 1, LIMITS) == (1, len(buf), 0)
    assert _items(twin) == _items(buf)
    theirs, ours = twin.snapshot(), buf.snapshot()
    assert (theirs.counters, theirs.reuse_hist.tolist(), theirs.step, theirs.rng_state) == (
        ours.counters, ours.reuse_hist.tolist(), ours.step, ours.rng_state)
    assert twin.stats()["buffer/bytes"] <= buf.stats()["buffer/bytes"]  # only the live rows' images came back


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled object", "undecodable header"])
def test_a_snapshot_that_does_not_load_is_skipped_with_a_warning_naming_it(tmp_path, damage):
    path = ckpt.save_buffer_snapshot(tmp_path, 5, 0, _filled())
    if damage == "garbage":
        path.write_bytes(b"\x00not a snapshot" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif damage == "pickled object":
        np.savez(path, meta=np.array([{"format": 1}], dtype=object))
    else:  # a valid npz whose sample header fails the receiver's checks (a caption that is not UTF-8)
        with np.load(path, allow_pickle=False) as data:
            arrays = dict(data)
        arrays["meta"] = arrays["meta"].copy()
        arrays["meta"][arrays["meta"].tobytes().index(b"a small red star")] = 0xC1  # never valid msgpack
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    buf = _buffer()
    with pytest.warns(UserWarning, match=re.escape(f"skipping the buffer snapshot {path}")):
        found = ckpt.restore_buffer_snapshots(path.with_name("step_00000005.pt"), buf, 0, 1, LIMITS)
    assert found == (1, 0, 0) and len(buf) == 0 and buf.stats()["buffer/inserts"] == 0


def test_with_fewer_ranks_each_takes_every_nth_snapshot_up_to_its_capacity(tmp_path):
    keys = []
    for rank in range(3):  # 4, 8 and 12 items
        buf = _buffer(seed=rank)
        for seq in range(rank + 1):
            buf.insert_many(_message(10 * rank + seq))
        keys.append([item[2] for item in _items(buf)])
        ckpt.save_buffer_snapshot(tmp_path, 8, rank, buf)
    checkpoint = tmp_path / "checkpoints" / "step_00000008.pt"
    rank0, rank1 = _buffer(capacity=10), _buffer(capacity=10)
    assert ckpt.restore_buffer_snapshots(checkpoint, rank0, 0, 2, LIMITS) == (3, 10, 6)
    assert ckpt.restore_buffer_snapshots(checkpoint, rank1, 1, 2, LIMITS) == (3, 8, 0)
    # its own snapshot first, then rank 2's as older items: the oldest 6 of those did not fit
    assert [item[2] for item in _items(rank0)] == keys[2][6:] + keys[0]
    assert [item[2] for item in _items(rank1)] == keys[1]
    assert ckpt.buffer_restore_summary(checkpoint, 3, 2, 18, 6) == (
        "checkpoint.buffer: 3 buffer snapshots, 2 trainer ranks now (redistributed: rank r takes snapshots r, "
        "r+2, ...): 18 items restored, 6 dropped (over buffer.capacity)")
    assert ckpt.restore_buffer_snapshots(checkpoint, _buffer(), 3, 4, LIMITS) == (3, 0, 0)  # more ranks: empty
    # a rank whose receiver inserted before the restore: its counts go on from the snapshot's plus its own,
    # and the snapshot's part alone is where its own counting starts (the ledger's baseline)
    late = _buffer()
    late.insert_many(_message(99))
    ckpt.restore_buffer_snapshots(checkpoint, late, 1, 2, LIMITS)
    assert late.restored_counters["inserts"] == 8 and late.stats()["buffer/inserts"] == 8 + 4


# ----------------------------------------------------------------------------- a resumed Trainer


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _trainer(tmp_path, **groups):
    from edsam_online.config import load_config
    from edsam_online.runtime import free_port
    from edsam_online.trainer import Trainer

    tree = {
        "stream": {"endpoints": [f"tcp://127.0.0.1:{free_port()}"]},  # no producer
        "method": {"name": "edsam"},
        "diffusion": {"model": "tiny-random"},
        "trainer": {"batch_size": 4, "steps": 6, "progress": False},
        "mix": {"extra_share": 0.5, "extra_wait_s": 0.0},
        "buffer": {"capacity": 64, "min_size_to_sample": 4},
        "runtime": {"device": "cpu", "num_workers": 1, "prefetch": 1},
        "data": {"length": 64},
        "logging": {"wandb": False, "log_every": 1},
        "run_dir": str(tmp_path / "run"),
    }
    for group, values in groups.items():
        tree.setdefault(group, {}).update(values)
    return Trainer(load_config(tree))


def test_a_resumed_trainer_starts_with_its_buffer_and_trains_its_first_step_on_it(tmp_path, capsys):
    first = _trainer(tmp_path, checkpoint={"buffer": True}, trainer={"stop_at": 2})
    for seq in range(4):
        first.buffer.insert_many(_message(seq, side=32, feedback=None))
    first.train()  # 2 steps on the buffer, then a checkpoint with it
    saved = read_snapshot(tmp_path / "run" / "checkpoints" / "step_00000002.buffer0.npz", LIMITS)
    assert len(saved) == 16 and saved.counters["samples"] == saved.uses.sum() >= 2 * first.extra_batch

    second = _trainer(tmp_path, checkpoint={"buffer": True, "resume": "latest"}, trainer={"stop_at": 3})
    assert "checkpoint.buffer: 1 buffer snapshots, 1 trainer ranks now (one per rank): 16 items restored, " \
           "0 dropped" in capsys.readouterr().err
    restored = second.buffer.snapshot()
    assert restored.uses.tolist() == saved.uses.tolist() and restored.counters == saved.counters
    second.train()  # step 3, with no producer anywhere
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics" / "trainer0.jsonl").read_text().splitlines()]
    (step3,) = [r for r in records if r["step"] == 3 and "train/extra_share_actual" in r]
    assert step3["train/extra_share_actual"] == second.extra_batch / second.real_batch == 0.5  # the full slot
    assert step3["train/extra_fallback_samples"] == 0  # no real fallback, before or after the resume
    # the ledger's baseline for the resumed process: where its restored buffer's counts started
    assert {k: step3[f"{RESTORED_PREFIX}buffer/{k}"] for k in ("inserts", "samples")} == {
        "inserts": saved.counters["inserts"], "samples": saved.counters["samples"]}
    assert ledger(tmp_path / "run").trainer["drawn"] == step3["buffer/samples"]  # counted once across the resume
