"""Producer rank: provenance on the wire, partitions, forwarded stats, never waiting on trainers."""

from __future__ import annotations

import json
import logging
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from _streaming_helpers import tiny_configs, wait_for
from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.producer import Producer, ProducerConfig, batch_seed
from edsam_online.sinks import ProgressLog, encode_fitting
from edsam_online.streaming import Receiver, StreamConfig
from edsam_online.wire import WireLimits


@pytest.fixture(scope="module")
def tiny():
    import torch

    from edsam_online.diffusion import build_sampler

    torch.set_num_threads(1)
    data, sampler_cfg = tiny_configs()
    return data, build_sampler(sampler_cfg)


def start_producer(tiny, pcfg, stream=None, **kw):
    """A Producer running in a thread, bound to a wildcard port; returns (thread, endpoint, result, producer)."""
    data, sampler = tiny
    bound, result = [], {}
    ready = threading.Event()

    def on_bound(endpoint):
        bound.append(endpoint)
        ready.set()

    stream = stream or StreamConfig(endpoints=["tcp://127.0.0.1:*"] * pcfg.num_producers)
    producer = Producer(stream, pcfg, data, sampler, on_bound=on_bound, install_signal_handlers=False, **kw)
    thread = threading.Thread(target=lambda: result.update(producer.run()))
    thread.start()
    assert ready.wait(30)
    return thread, bound[0], result, producer


def collect(buf):
    buf_items = []
    while (s := buf.sample(0)) is not None:
        buf_items.append(s)
    return buf_items


def test_samples_carry_provenance_and_forwarded_stats(tiny):
    buf = ReplayBuffer(BufferConfig(capacity=100, max_times_sampled=1, min_size_to_sample=1, samples_per_insert=0))
    pcfg = ProducerConfig(num_samples=8, batch_size=2, m=2, seed=3, stats_every=1)
    thread, endpoint, result, _ = start_producer(tiny, pcfg)
    with Receiver(StreamConfig(endpoints=[endpoint]), buf) as receiver:
        thread.join(60)
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 8)
        producer_stats = receiver.producer_stats()
    items = collect(buf)
    assert sorted(s.header["seq"] for s in items) == list(range(8))
    for s in items:
        h = s.header
        assert (s.source_key, s.caption, s.alpha) == (h["source_key"], h["caption"], h["alpha"])
        assert h["producer_id"] == "producer-0" and h["source_key"].startswith("flat-")
        assert s.caption and h["model_id"].startswith("tiny-random")
        assert abs(h["alpha"]) <= h["rho"] == tiny[1].cfg.rho
        assert h["mode"] == "transport" and h["sample_index"] in (0, 1)
        assert s.image.shape == (32, 32, 3)
        assert s.source_thumb.shape == (32, 32, 3)  # producer.source_thumb_px's default
    # M=2 samples per real image share caption and source key, with distinct alphas.
    by_source = {}
    for s in items:
        by_source.setdefault(s.header["source_key"], []).append(s)
    assert all(len(v) == 2 and v[0].caption == v[1].caption and v[0].header["alpha"] != v[1].header["alpha"]
               for v in by_source.values())
    assert result["producer/sent"] == 8 and result["producer/dropped_unsent"] == 0
    assert result["producer/samples_per_s"] > 0 and result["producer/unet_calls_per_s"] > 0
    for name in ("producer/samples_per_s", "producer/unet_calls_per_s", "producer/send_blocked_s"):
        assert name in producer_stats
    assert producer_stats["producer/active"] == 1


@pytest.mark.parametrize("stream_kw, messages", [
    (dict(samples_per_message=3), 3),  # batches of 4 samples: [3, 1] + [3] (the 7-sample limit)
    # one 32x32 image fits
    (dict(samples_per_message=16, limits=WireLimits(max_message_bytes=12_000, max_header_bytes=4000)), 7),
])
def test_samples_are_packed_per_message_within_the_limits(tiny, stream_kw, messages, caplog):
    caplog.set_level(logging.INFO, logger="edsam_online")
    buf = ReplayBuffer(BufferConfig(capacity=100, max_times_sampled=1, min_size_to_sample=1, samples_per_insert=0))
    pcfg = ProducerConfig(num_samples=7, batch_size=2, m=2, seed=3)
    stream = StreamConfig(endpoints=["tcp://127.0.0.1:*"], **stream_kw)
    thread, endpoint, result, _ = start_producer(tiny, pcfg, stream)
    with Receiver(StreamConfig(endpoints=[endpoint], **stream_kw), buf) as receiver:
        thread.join(60)
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 7)
        stats = receiver.stats()
    assert stats["buffer/received"] == messages and stats["buffer/dropped"] == 0 and stats["buffer/seq_gaps"] == 0
    assert sorted(s.header["seq"] for s in collect(buf)) == list(range(7))
    assert result["producer/sent"] == 7 and result["producer/generated"] == 8  # 2 batches of 4 rows
    assert result["producer/over_limit"] == 1  # the last row, past num_samples
    assert f"producer producer-0: done: sent 7 samples in {messages} messages, 0 dropped unsent;" in caplog.text


def test_a_message_is_split_until_its_header_fits():
    from edsam_online.diffusion import GeneratedBatch

    k = 8  # 8 sources with 1000-character captions: 4 do not fit in a 4096-byte header, 3 do
    generated = GeneratedBatch(
        images=np.zeros((k, 8, 8, 3), np.uint8), source_keys=[f"s{i}" for i in range(k)],
        captions=[f"{i} " + "x" * 1000 for i in range(k)], source=np.arange(k), alpha=np.full(k, 0.1),
        seed=np.arange(k), sample_index=np.zeros(k, np.int64), rho=0.5, model_id="m", mode="transport", steps=5,
        inversion_steps=5, guidance=1.0)
    cfg = StreamConfig(limits=WireLimits(max_header_bytes=4096))
    first, ends = 0, []
    while first < k:
        first, frames = encode_fitting(generated, first, k, cfg, "p", 1, 0)
        assert frames is not None and len(frames[0]) <= 4096
        ends.append(first)
    assert ends == [2, 5, 8]  # 8 -> 4 -> 2 samples fit; then the 6 left -> 3, and the last 3
    # A single sample whose header cannot fit is reported, not sent.
    small = StreamConfig(limits=WireLimits(max_header_bytes=512))
    assert encode_fitting(generated, 0, k, small, "p", 1, 0) == (1, None)


def test_producer_ranks_read_disjoint_partitions_with_distinct_seeds(tiny):
    buf = ReplayBuffer(BufferConfig(capacity=100, max_times_sampled=1, min_size_to_sample=1, samples_per_insert=0))
    stream = StreamConfig(endpoints=["tcp://127.0.0.1:*"] * 2)
    started = [start_producer(tiny, ProducerConfig(rank=r, num_producers=2, num_samples=6, m=1, seed=0), stream)
               for r in range(2)]
    with Receiver(StreamConfig(endpoints=[ep for _, ep, _, _ in started]), buf) as receiver:
        for thread, _, _, _ in started:
            thread.join(60)
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 12)
    items = collect(buf)
    keys = {r: {s.header["source_key"] for s in items if s.header["producer_id"] == f"producer-{r}"} for r in range(2)}
    seeds = {r: {s.header["seed"] for s in items if s.header["producer_id"] == f"producer-{r}"} for r in range(2)}
    assert len(keys[0]) == len(keys[1]) == 6
    assert not keys[0] & keys[1]
    assert not seeds[0] & seeds[1]
    assert len({batch_seed(0, r, b) for r in range(4) for b in range(100)}) == 400


def test_producer_never_waits_on_missing_trainers(tiny):
    pcfg = ProducerConfig(num_samples=0, batch_size=1, m=1, send_timeout_s=0.1, stop_grace_s=0.1)
    thread, _, result, producer = start_producer(tiny, pcfg)
    # it goes on generating, each message dropped after send_timeout_s: it never waits for a trainer
    assert wait_for(lambda: producer.state["dropped_unsent"] >= 2, timeout_s=120)
    producer.stop()
    thread.join(120)
    assert not thread.is_alive()
    assert result["producer/sent"] == 0
    assert result["producer/dropped_unsent"] >= 2
    # each dropped message waited its send_timeout_s, but the one the stop's grace cut short
    assert result["producer/send_blocked_s"] >= 0.1 * (result["producer/dropped_unsent"] - 1) * 0.9


@pytest.mark.parametrize("every_s,records", [(1e-9, 2), (0, 1)])  # after each batch; off: the last record only
def test_metrics_go_to_the_metric_logger_and_the_log(tiny, tmp_path, caplog, every_s, records):
    from edsam_online.metrics import LoggingConfig

    caplog.set_level(logging.INFO, logger="edsam_online")
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    pcfg = ProducerConfig(num_samples=2, m=1, log_every_s=every_s)  # one batch of 2
    thread, endpoint, _, _ = start_producer(tiny, pcfg, logging_cfg=LoggingConfig(wandb=False), run_dir=str(tmp_path))
    with Receiver(StreamConfig(endpoints=[endpoint]), buf):
        thread.join(60)
    lines = [json.loads(x) for x in (tmp_path / "metrics" / "producer0.jsonl").read_text().splitlines()]
    assert len(lines) == records
    assert lines[-1]["producer/sent"] == 2 and lines[-1]["role"] == "producer"
    progress = [r.getMessage() for r in caplog.records if "samples/s over the last" in r.getMessage()]
    assert len(progress) == records - 1  # a line with each periodic record
    assert all(" waiting for delivery" in line and "filtered below min_score" in line for line in progress)
    assert "producer producer-0: streams to trainers from tcp://127.0.0.1:" in caplog.text


def test_the_progress_line_gives_the_rates_over_its_interval_and_the_totals():
    now = [100.0]
    progress = ProgressLog("p-1", 30, clock=lambda: now[0])
    metrics = {"producer/sent": 60, "producer/send_blocked_s": 3.0, "producer/generate_s": 24.0,
               "producer/filtered": 5}
    now[0] = 129.9
    assert not progress.due()
    now[0] = 130.0
    assert progress.due()
    line = progress.line(metrics, "sent 60 samples in 4 messages, 8 dropped unsent", waiting=12)
    assert line == ("producer p-1: 2.00 samples/s over the last 30 s (generator busy 80%, send blocked 10%); "
                    "sent 60 samples in 4 messages, 8 dropped unsent; 5 filtered below min_score; "
                    "12 waiting for delivery")
    assert not progress.due()  # a line starts the next interval
    now[0] = 150.0
    metrics.update({"producer/sent": 100, "producer/send_blocked_s": 13.0, "producer/feedback_applied": 7})
    line = progress.line(metrics, "sent 100", waiting=0)
    assert line.startswith("producer p-1: 2.00 samples/s over the last 20 s (generator busy 0%, send blocked 50%)")
    assert line.endswith("; feedback applied 7")
    assert not ProgressLog("p-1", 0, clock=lambda: now[0] + 1e6).due()  # 0: never


class KnownScorer:
    """Scores its first batch 0 everywhere, then each batch of 4 rows [0.1, 0.6, 0.49, 0.5]."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, captions):
        assert len(images) == len(captions) == 4 and all(isinstance(c, str) and c for c in captions)
        self.calls += 1
        return np.zeros(4, np.float32) if self.calls == 1 else np.array([0.1, 0.6, 0.49, 0.5], np.float32)


def test_the_fidelity_filter_drops_and_counts_exactly_the_samples_below_min_score(tiny):
    buf = ReplayBuffer(BufferConfig(capacity=100, max_times_sampled=1, min_size_to_sample=1, samples_per_insert=0))
    pcfg = ProducerConfig(num_samples=8, batch_size=2, m=2, seed=3, scorer="attributes", min_score=0.5)
    scorer = KnownScorer()
    thread, endpoint, result, _ = start_producer(tiny, pcfg, scorer=scorer)
    with Receiver(StreamConfig(endpoints=[endpoint]), buf) as receiver:
        thread.join(60)
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 8)
        stats = receiver.stats()
    items = collect(buf)
    # 5 batches of 4: the first filtered whole, then 2 of each 4 below 0.5 (0.5 itself stays).
    assert scorer.calls == 5 and result["producer/filtered"] == 4 + 4 * 2
    assert result["producer/generated"] == 5 * 4 and result["producer/over_limit"] == 0  # filtered + sent
    assert result["producer/sent"] == 8 and stats["buffer/dropped"] == 0 and stats["buffer/seq_gaps"] == 0
    assert sorted(s.score for s in items) == [0.5] * 4 + [pytest.approx(0.6)] * 4
    # rows 1 and 3 of each batch: the second sample of each of its two sources
    assert all(s.header["sample_index"] == 1 for s in items) and len({s.source_key for s in items}) == 8


def test_a_scorer_must_match_the_config():
    with pytest.raises(ValueError, match="scorer"):
        Producer(StreamConfig(), ProducerConfig(scorer="attributes"), None, None, scorer=None)
    with pytest.raises(ValueError, match="scorer"):
        Producer(StreamConfig(), ProducerConfig(), None, None, scorer=KnownScorer())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_producers=0), "num_producers"),
        (dict(rank=2, num_producers=2), "rank"),
        (dict(num_samples=-1), "num_samples"),
        (dict(batch_size=0), "batch_size"),
        (dict(m=0), "m"),
        (dict(send_timeout_s=-1), "send_timeout_s"),
        (dict(log_every_s=-1), "log_every_s"),
        (dict(endpoint_index=-1), "endpoint_index"),
        (dict(scorer="blip"), "scorer"),
        (dict(scorer="attributes", min_score=1.5), "min_score"),
        (dict(min_score=0.5), "min_score"),
        (dict(scorer="clip"), "scorer_model"),
        (dict(source_thumb_px=-1), "source_thumb_px"),
        (dict(source_thumb_px=129), "source_thumb_px"),
    ],
)
def test_producer_config_errors_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ProducerConfig(**kwargs)


# ----------------------------------------------------------------------------- pipelined vs sequential


def _pull_all(endpoint, count, timeout_s=60):
    """Every message a PULL socket gets from ``endpoint`` until ``count`` samples came, in
    arrival order: [(sample header without session/time/stats, image bytes)]."""
    import zmq

    from edsam_online.wire import decode_message

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(endpoint)
    samples, deadline = [], time.monotonic() + timeout_s
    try:
        while len(samples) < count and time.monotonic() < deadline:
            if sock.poll(100):
                _, batch = decode_message(sock.recv_multipart(copy=False), WireLimits())
                for i in range(len(batch)):
                    h = {k: v for k, v in batch.sample_header(i).items()
                         if k not in ("session", "created_at", "stats")}
                    samples.append((h, batch.images[i].tobytes()))
    finally:
        sock.close(linger=0)
        ctx.term()
    return samples


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_pipelined_and_sequential_producers_send_the_same_samples_in_the_same_order(tiny, encoding):
    received, results = {}, {}
    for pipeline in (True, False):
        pcfg = ProducerConfig(num_samples=7, batch_size=2, m=2, seed=5, pipeline=pipeline, data_workers=2)
        stream = StreamConfig(endpoints=["tcp://127.0.0.1:*"], samples_per_message=3, encoding=encoding)
        thread, endpoint, result, _ = start_producer(tiny, pcfg, stream)
        received[pipeline] = _pull_all(endpoint, 7)
        thread.join(60)
        assert not thread.is_alive()
        results[pipeline] = result
    assert [h["seq"] for h, _ in received[True]] == list(range(7))  # exactly num_samples (and sent == 7 below)
    assert received[True] == received[False]  # provenance and image bytes, in order
    for result in results.values():
        assert result["producer/sent"] == 7 and result["producer/dropped_unsent"] == 0
        assert result["producer/generated"] == 8 and result["producer/over_limit"] == 1
        assert 0 < result["producer/generator_busy_frac"] <= 1
        assert 0 < result["producer/generate_s"]


def test_a_steered_producer_that_hears_no_feedback_sends_what_a_uniform_one_sends(tiny):
    received = {}
    ones = lambda images, captions: np.ones(len(images), np.float32)  # noqa: E731
    for policy in ("uniform", "adversarial"):
        pcfg = ProducerConfig(num_samples=8, batch_size=2, m=2, seed=5, scorer="attributes", policy=policy)
        thread, endpoint, _, producer = start_producer(tiny, pcfg, scorer=ones)
        received[policy] = _pull_all(endpoint, 8)
        thread.join(60)
    uniform, steered = received["uniform"], received["adversarial"]
    assert [h["alpha"] for h, _ in steered] == [h["alpha"] for h, _ in uniform]  # Eq. 9's draw, bit for bit
    assert [img for _, img in steered] == [img for _, img in uniform]
    assert all(h["feedback"].startswith("tcp://127.0.0.1:") for h, _ in steered)  # where to report them
    assert all("feedback" not in h for h, _ in uniform)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_stop_while_the_sender_is_blocked_ends_within_the_grace_and_counts_what_went_unsent(tiny, pipeline,
                                                                                            caplog):
    caplog.set_level(logging.INFO, logger="edsam_online")
    pcfg = ProducerConfig(batch_size=1, m=2, send_timeout_s=60, stop_grace_s=0.5, pipeline=pipeline)
    thread, _, result, producer = start_producer(tiny, pcfg)  # no receiver: the first send blocks
    assert wait_for(lambda: producer.state["blocked_s"] > 0.5, timeout_s=120)
    if pipeline:  # the generator fills the queue behind the blocked message
        assert wait_for(lambda: producer.state["generated"] >= 2 * (pcfg.queue_batches + 2), timeout_s=120)
    producer.stop()
    thread.join(120)
    assert not thread.is_alive()
    assert result["producer/sent"] == 0
    assert result["producer/dropped_unsent"] == 2  # the message in flight (both samples of the first batch)
    if pipeline:  # the batches queued behind it were never tried
        assert result["producer/unsent_at_stop"] >= 2 * pcfg.queue_batches
    # every generated sample is counted once: dropped in flight, or left at the stop
    assert result["producer/generated"] == (result["producer/dropped_unsent"] + result["producer/unsent_at_stop"]
                                            + result["producer/over_limit"])
    # What the stop cost is said once (each batch queued at the stop used to add a line), and truly:
    # the blocked send was cut by the grace, not by send_timeout_s.
    unsent = [r for r in caplog.records if "unsent" in r.getMessage()]
    assert len(unsent) == 1 and unsent[0].levelno == logging.WARNING
    line = unsent[0].getMessage()
    assert line.startswith("producer producer-0: done: sent 0 samples in 0 messages, "
                           "2 dropped unsent (2 when the stop's stop_grace_s=0.5s ran out)")
    if pipeline:
        assert f", {result['producer/unsent_at_stop']} generated samples left unsent at the stop" in line
    assert "within 60.0s" not in caplog.text


def test_a_failure_in_the_delivery_thread_is_raised_by_run(tiny, monkeypatch):
    import edsam_online.sinks as sinks_module

    calls = []
    real_encode = sinks_module.encode_message

    def failing_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder broke")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(sinks_module, "encode_message", failing_encode)
    buf = ReplayBuffer(BufferConfig(capacity=1000, min_size_to_sample=1, samples_per_insert=0))
    pcfg = ProducerConfig(batch_size=1, m=1, pipeline=True, stop_grace_s=0.5)  # num_samples=0: runs until stopped
    data, sampler = tiny
    bound, errors = [], []
    producer = Producer(StreamConfig(endpoints=["tcp://127.0.0.1:*"]), pcfg, data, sampler,
                        on_bound=bound.append, install_signal_handlers=False)

    def run():
        try:
            producer.run()
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: bound)
    with Receiver(StreamConfig(endpoints=bound), buf):
        thread.join(30)
    assert not thread.is_alive(), "run() hung after its delivery thread failed"
    assert [str(e) for e in errors] == ["encoder broke"]
    assert producer.state["sent"] == 2  # the two messages before the failure, none after it


def _csv_with_a_corrupt_image(tmp_path, good=5):
    from edsam_online.data import render_sample

    (tmp_path / "img").mkdir()
    lines = ["path,caption"]
    for i in range(good):
        s = render_sample(i, "flat", 32, 0)
        Image.fromarray(s.image).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{s.caption}")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG not really")
    lines.insert(3, "img/bad.png,a corrupt picture")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.csv")


def test_the_pipelined_reader_skips_and_counts_a_corrupt_image(tiny, tmp_path, caplog):
    from edsam_online.data import RealDataConfig

    caplog.set_level(logging.INFO, logger="edsam_online")

    data = RealDataConfig(kind="csv", path=_csv_with_a_corrupt_image(tmp_path), epochs=1, shuffle=False, resolution=32)
    pcfg = ProducerConfig(batch_size=2, m=1, sink="shards", shard_dir=str(tmp_path / "shards"), data_workers=2)
    result = Producer(StreamConfig(), pcfg, data, tiny[1], install_signal_handlers=False).run()
    assert result["producer/data/corrupt_images"] == 1
    assert result["producer/sent"] == 5  # every good image once (m=1); the data ran out after one epoch
    (shard,) = (tmp_path / "shards").glob("*.tar")
    captions = tarfile.open(shard).getnames()
    assert len([c for c in captions if c.endswith(".txt")]) == 5
    # The shard sink says where it writes and what it wrote, never "sent"
    assert f"producer producer-0: writes shards of 1000 samples to {tmp_path / 'shards'}" in caplog.text
    size = f"{shard.stat().st_size / 1e6:.1f} MB"
    assert (f"producer producer-0: done: wrote 5 samples to 1 shard file ({size}) in {tmp_path / 'shards'}; "
            "0 filtered below min_score") in caplog.text
    assert " sent " not in caplog.text and "messages" not in caplog.text


def test_a_producer_whose_data_decodes_to_nothing_stops_with_a_clear_error(tiny, tmp_path):
    from edsam_online.data import RealDataConfig

    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "data.csv").write_text("path,caption\nbad.png,a corrupt picture\n")
    data = RealDataConfig(kind="csv", path=str(tmp_path / "data.csv"), resolution=32)
    pcfg = ProducerConfig(sink="shards", shard_dir=str(tmp_path / "shards"))
    with pytest.raises(ValueError, match="no image of a whole epoch"):
        Producer(StreamConfig(), pcfg, data, tiny[1], install_signal_handlers=False).run()


def test_a_producer_w_and_b_run_carries_the_resolved_config(tiny, tmp_path, monkeypatch):
    from edsam_online.metrics import LoggingConfig
    from edsam_online.wandb_offline import read_run

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    data, sampler = tiny
    resolved = {"producer": {"rank": 0, "batch_size": 1}, "diffusion": {"model": "tiny-random"}}
    pcfg = ProducerConfig(batch_size=1, m=2, num_samples=2, sink="shards", shard_dir=str(tmp_path / "shards"))
    producer = Producer(StreamConfig(), pcfg, data, sampler, logging_cfg=LoggingConfig(wandb_all_ranks=True),
                        run_dir=str(tmp_path / "run"), resolved=resolved, install_signal_handlers=False)
    assert producer.run()["producer/sent"] == 2
    (run,) = [read_run(f) for f in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert run.job_type == "producer" and run.group == "run"
    assert run.config == resolved
