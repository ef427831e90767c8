"""The sample ledger: every generated sample counted once, from the producer's generator to the
trainer's draws, and the two identities checked over every producer and trainer rank of a run."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from _streaming_helpers import tiny_configs, valid_frames, wait_for
from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.ledger import FINAL_KEY, PRODUCER_COUNTERS, RESTORED_PREFIX, format_ledger, ledger
from edsam_online.streaming import Receiver, StreamConfig


def text_of(path) -> str:
    return path.read_text()[-4000:] if path.exists() else ""


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _producer(generated, filtered, sent, dropped=0, at_stop=0, over=0, final=True):
    values = dict(zip(PRODUCER_COUNTERS, (generated, filtered, sent, dropped, at_stop, over)))
    return {**{f"producer/{k}": v for k, v in values.items()}, **({FINAL_KEY: 1} if final else {})}


def _trainer(accepted, in_flight=0, inserts=0, samples=0, reused=0, final=True, **dropped):
    record = {"buffer/accepted": accepted, "buffer/in_flight": in_flight, "buffer/inserts": inserts,
              "buffer/samples": samples, "buffer/reused": reused, "buffer/dropped_unsized": 0,
              "buffer/dropped_samples": sum(dropped.values()),
              **{f"buffer/dropped_samples/{k}": v for k, v in dropped.items()}}
    return {**record, **({FINAL_KEY: 1} if final else {})}


def test_the_ledger_sums_every_process_of_every_file_and_names_the_unfinished(tmp_path):
    metrics = tmp_path / "metrics"
    # producer 0: a process, then a restarted one (its counters start again at 0)
    _write(metrics / "producer0.jsonl", [_producer(8, 0, 4, final=False), _producer(12, 2, 8, over=2),
                                         _producer(4, 0, 4, final=False), _producer(10, 1, 6, 2, 1)])
    _write(metrics / "producer1.jsonl", [_producer(20, 0, 20)])
    # rank 0 resumed with its buffer restored: the receiver's counts restart, the buffer's go on from its
    # snapshot, taken before the stopping receiver inserted its last 2 (below where the process ended)
    restored = {f"{RESTORED_PREFIX}buffer/{k}": v for k, v in dict(inserts=10, samples=40, reused=28).items()}
    _write(metrics / "trainer0.jsonl", [
        _trainer(10, inserts=10, samples=30, reused=20, final=False), {"eval/zeroshot_top1/flat": 0.5},
        _trainer(12, 2, inserts=12, samples=40, reused=28),
        {**_trainer(1, inserts=11, samples=60, reused=43, final=False), **restored},
        _trainer(9, inserts=19, samples=80, reused=59)])
    _write(metrics / "trainer1.jsonl", [_trainer(10, inserts=10, samples=20, reused=10, duplicate=1)])
    book = ledger(tmp_path)
    assert book.producer == dict(generated=42, filtered=3, sent=34, dropped_unsent=2, unsent_at_stop=1, over_limit=2)
    assert book.trainer == dict(accepted=31, in_flight=2, dropped=1, dropped_unsized=0, inserted=31, drawn=100,
                                reused=69)
    assert book.dropped == {"duplicate": 1}
    assert (book.producer_processes, book.trainer_processes, book.unfinished) == (3, 3, [])
    assert book.generation_gap == 0 and book.stream_gap == 0 and book.balances
    text = format_ledger(book)
    assert text.splitlines()[0] == "sample ledger (3 producer and 3 trainer processes): balances"
    assert ("generated 42 = filtered 3 + sent 34 + unsent 5 (dropped at send 2, left at the stop 1, "
            "past num_samples 2): balances") in text
    assert "sent 34 = accepted 31 + dropped 1 (duplicate 1) + in flight 2: balances" in text
    assert "buffer: inserted 31, drawn 100, reused 69" in text

    # a producer killed before its last record: its counts fall short, and the file is named
    _write(metrics / "producer2.jsonl", [_producer(6, 0, 3, final=False)])
    book = ledger(tmp_path)
    assert book.unfinished == ["producer2"] and book.stream_gap == 3 and not book.balances
    assert book.running == ["producer2"]  # its newest process has not ended: the trainer says so, not the sums
    text = format_ledger(book)
    assert "sent 37 = accepted 31 + dropped 1 (duplicate 1) + in flight 2: does NOT balance: off by +3" in text
    assert "generated 48 = filtered 3 + sent 37 + unsent 5 (" in text and "does NOT balance: off by +3" in text
    assert "no final record (still running, or killed): producer2" in text
    # a producer killed, then restarted and ended: named as unfinished, but no longer running
    _write(metrics / "producer2.jsonl", [_producer(6, 0, 3, final=False), _producer(2, 0, 2)])
    book = ledger(tmp_path)
    assert book.unfinished == ["producer2 (1 of 2 processes)"] and book.running == []


def test_the_report_shows_the_ledger_of_its_run(tmp_path):
    from edsam_online.report import render

    run = shutil.copytree(Path(__file__).parent / "fixtures" / "edsam_run", tmp_path / "run")  # a demo run
    book = ledger(run)
    assert book.producer_processes == book.trainer_processes == 1 and book.producer["sent"] > 0
    text = render(run).read_text()
    assert f"<h2>Sample ledger</h2><pre>{html.escape(format_ledger(book))}</pre>" in text


def test_a_run_without_a_stream_has_no_ledger(tmp_path):
    _write(tmp_path / "metrics" / "trainer0.jsonl", [{"train/loss": 1.0}])
    assert format_ledger(ledger(tmp_path)) == "sample ledger: no producer or receiver counts in this run"


@pytest.fixture(scope="module")
def tiny():
    import torch

    from edsam_online.diffusion import build_sampler

    torch.set_num_threads(1)
    data, sampler_cfg = tiny_configs()
    return data, build_sampler(sampler_cfg)


def test_a_producer_counts_every_generated_sample_once_and_its_receiver_every_sent_one(tiny):
    from edsam_online.producer import Producer, ProducerConfig

    data, sampler = tiny
    every_other = lambda images, captions: (np.arange(len(images)) % 2 == 0).astype(np.float32)  # noqa: E731
    # 4 rows a batch, 2 of them filtered; 7 samples: 4 batches, the last row past num_samples
    pcfg = ProducerConfig(num_samples=7, batch_size=2, m=2, scorer="attributes", min_score=0.5)
    bound = []
    producer = Producer(StreamConfig(endpoints=["tcp://127.0.0.1:*"]), pcfg, data, sampler, on_bound=bound.append,
                        install_signal_handlers=False, scorer=every_other)
    result = {}
    thread = threading.Thread(target=lambda: result.update(producer.run()))
    thread.start()
    assert wait_for(lambda: bound, timeout_s=60)
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    with Receiver(StreamConfig(endpoints=bound), buf) as receiver:
        thread.join(120)
        assert wait_for(lambda: receiver.accepted == 7, timeout_s=60)
    counts = {k: result[f"producer/{k}"] for k in PRODUCER_COUNTERS}
    assert counts == dict(generated=16, filtered=8, sent=7, dropped_unsent=0, unsent_at_stop=0, over_limit=1)
    stats = receiver.stats()
    assert (stats["buffer/accepted"], stats["buffer/in_flight"], stats["buffer/dropped_samples"]) == (7, 0, 0)
    assert stats["buffer/inserts"] == 7


class _HeldBuffer(ReplayBuffer):
    """A buffer whose first insert waits for ``release``: the receiver is busy while messages queue."""

    def __init__(self):
        super().__init__(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
        self.entered, self.release = threading.Event(), threading.Event()

    def insert_many(self, values):
        self.entered.set()
        assert self.release.wait(120)
        super().insert_many(values)


def test_messages_queued_at_the_stop_are_counted_in_flight_and_drops_count_their_samples():
    ctx = zmq.Context()
    client = ctx.socket(zmq.PUSH)
    client.bind("tcp://127.0.0.1:*")
    buf = _HeldBuffer()
    receiver = Receiver(StreamConfig(endpoints=[client.last_endpoint.decode()], poll_timeout_ms=500), buf).start()
    try:
        client.send_multipart(valid_frames(0))
        assert buf.entered.wait(60)  # the receiver holds message 0
        client.send_multipart(valid_frames(0))  # a replay: dropped as a duplicate, 1 sample
        header = json.dumps({"v": 3}).encode()  # not msgpack: no sample count to read
        client.send_multipart([header, b"x"])
        for seq in (1, 2, 3):
            client.send_multipart(valid_frames(seq))
        client.close(linger=60_000)  # returns once every message left for the receiver
        stopper = threading.Thread(target=receiver.stop, kwargs={"timeout_s": 120})
        stopper.start()
        assert wait_for(lambda: receiver._stop.is_set(), timeout_s=60)
        buf.release.set()
        stopper.join(120)
        assert not receiver.is_alive()
    finally:
        buf.release.set()
        receiver.stop()
        ctx.term()
    stats = receiver.stats()
    assert (stats["buffer/accepted"], stats["buffer/in_flight"], stats["buffer/inserts"]) == (1, 3, 1)
    assert stats["buffer/dropped_samples/duplicate"] == 1 and stats["buffer/dropped_samples"] == 1
    assert stats["buffer/dropped/not_msgpack"] == 1 and stats["buffer/dropped_unsized"] == 1


def test_two_producers_into_two_trainer_ranks_learn_and_balance_exactly_after_a_clean_end(tmp_path):
    """2 producers x 2 torchrun ranks: the producers send ``num_samples`` each and end; the ranks
    train on real and streamed samples and learn; then they are stopped (SIGTERM, as a
    preemption) and log their final counts. Every sample is then in exactly one count: the
    ledger balances, in the trainer's last lines and from the files."""
    import math

    from test_trainer_dist import COMMON, TORCHRUN, _start, _stop, _train_logs, _wait

    from edsam_online.runtime import free_port

    run_dir = tmp_path / "run"
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    stream = f"stream.endpoints=[{','.join(endpoints)}]"
    n, batch, steps = 30, 8, 30  # 8 producer batches of 4 rows: the last 2 rows of each past num_samples
    producers = [_start([sys.executable, "-m", "producers", *COMMON, f"run_dir={run_dir}", stream,
                         f"producer.rank={r}", "producer.num_producers=2", f"producer.num_samples={n}",
                         "producer.batch_size=2", "producer.threads=1", "producer.send_timeout_s=120"],
                        tmp_path / f"producer{r}.log") for r in range(2)]
    log = tmp_path / "trainer.log"
    trainer = _start([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "consumers.train", *COMMON,
                      f"run_dir={run_dir}", stream, "trainer.steps=100000", f"trainer.batch_size={batch}",
                      "mix.extra_share=0.5", "mix.extra_wait_s=0.05", "buffer.min_size_to_sample=1",
                      "buffer.samples_per_insert=0", "eval.every_steps=0", "runtime.threads=1"], log)
    try:
        for r, producer in enumerate(producers):
            _wait(producer, 240, tmp_path / f"producer{r}.log")
        # both ranks in their loop (a signal before it would end them unlogged), past `steps`
        assert wait_for(lambda: all(_train_logs(run_dir, r) and _train_logs(run_dir, r)[-1]["step"] >= steps
                                    for r in (0, 1)), 240, 0.2), text_of(log)
        os.killpg(os.getpgid(trainer.pid), signal.SIGTERM)
        trainer.wait(120)  # torchrun exits 1 when signalled; its ranks stop after their step
    finally:
        for proc in [*producers, trainer]:
            _stop(proc, signal.SIGKILL)
    text = log.read_text()
    assert all(f"rank {r} stopped at step" in text for r in (0, 1)), text[-4000:]
    for rank in (0, 1):  # each rank trained on streamed samples, with finite losses
        logs = _train_logs(run_dir, rank)
        assert all(math.isfinite(r["train/loss"]) for r in logs)
        assert logs[-1]["buffer/accepted"] > 0 and logs[-1]["train/extra_samples"] > 0, f"rank {rank} got no samples"
        assert any(r["train/extra_share_actual"] > 0 for r in logs)
    logs = _train_logs(run_dir, 0)
    first, last = logs[0]["train/loss_real"], sum(r["train/loss_real"] for r in logs[-3:]) / 3
    chance = math.log(2 * batch)  # InfoNCE of a model that cannot tell the 2 x batch gathered real pairs apart
    assert last < first - 0.3 and last < chance - 0.3, [r["train/loss_real"] for r in logs]

    book = ledger(run_dir)
    assert book.producer == dict(generated=64, filtered=0, sent=60, dropped_unsent=0, unsent_at_stop=0, over_limit=4)
    t = book.trainer
    assert t["accepted"] + t["in_flight"] == 60 and t["dropped"] == t["dropped_unsized"] == 0
    assert t["inserted"] == t["accepted"] and t["drawn"] >= t["reused"] >= t["drawn"] - t["inserted"]
    assert (book.producer_processes, book.trainer_processes, book.unfinished) == (2, 2, [])
    assert book.balances, format_ledger(book)
    assert format_ledger(book) in text  # what trainer rank 0 printed at its end
