"""Receiver and transport: hostile input, CURVE, many-to-many processes, producer crash."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from _streaming_helpers import producer_main, receiver_main, valid_frames, wait_for
from edsam_online import monitor
from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.diffusion import GeneratedBatch
from edsam_online.sinks import open_producer_socket, send_bounded
from edsam_online.runtime import free_port
from edsam_online.security import generate_keys, make_curve_client
from edsam_online.streaming import Receiver, StreamConfig
from edsam_online.wire import WireLimits, encode_message

SPAWN = mp.get_context("spawn")


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def push_bound(ctx, setup=None):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.sndtimeo = 10_000
    if setup is not None:
        setup(sock)
    sock.bind("tcp://127.0.0.1:*")
    return sock, sock.last_endpoint.decode()


def raw(frames):
    return [bytes(f.buffer) if isinstance(f, zmq.Frame) else bytes(f) for f in frames]


def header_with(frames, **changes):
    header, payload = raw(frames)
    h = msgpack.unpackb(header)
    for key, value in changes.items():
        if value is KeyError:
            h.pop(key)
        else:
            h[key] = value
    return [msgpack.packb(h), payload]


def u8(value):
    return np.array([value], "<u8").tobytes()


def test_hostile_input_is_dropped_by_reason_and_valid_messages_still_arrive(ctx):
    limit = 100_000
    cfg = StreamConfig(limits=WireLimits(max_message_bytes=limit, max_header_bytes=16_384, max_caption_chars=1000))
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    client, endpoint = push_bound(ctx)
    good = valid_frames(0)
    jpeg = raw(valid_frames(0, "jpeg"))
    truncated = jpeg[1][: len(jpeg[1]) // 2]
    hostile = {
        "not_msgpack": [b"\xc1\xc1\xc1 definitely not msgpack", raw(good)[1]],
        "not_a_map": [msgpack.packb(["v", 1]), raw(good)[1]],
        "version": header_with(good, v=2),  # the schema of msgpack-list columns
        "missing_field": header_with(good, caption=KeyError),
        "bad_count": header_with(good, alpha=np.array([0.1, 0.2]).tobytes()),  # two alphas, one image
        "wrong_type": header_with(good, seq="7"),
        "size_mismatch": header_with(good, shape=[16, 17, 3]),
        "oversized": header_with(good, nbytes=u8(limit - 100))[:1] + [b"\x00" * (limit - 100)],
        "undecodable": header_with(valid_frames(0, "jpeg"), nbytes=u8(len(truncated)))[:1] + [truncated],
        "bad_shape": header_with(good, shape=[-16, 10**9, 3]),
        "bad_value": header_with(good, alpha=np.array([float("nan")]).tobytes()),
        "frame_count": raw(good) + [b"extra frame"],
        "caption_too_long": header_with(good, caption=["x" * 5000]),
        "header_too_large": header_with(good, caption=["x" * 20_000]),
        "bad_stats": header_with(good, stats={"producer/x": [1, 2]}),
    }
    with Receiver(cfg, buf, endpoints=[endpoint]) as receiver:
        client.send_multipart(raw(good))
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 1)
        client.send_multipart(raw(good))  # replayed sequence number
        for frames in hostile.values():
            client.send_multipart(frames)
        client.send(b"single frame")  # also a frame_count defect
        expected = {reason: 1 for reason in hostile} | {"frame_count": 2, "duplicate": 1}
        assert wait_for(lambda: receiver.stats()["buffer/dropped"] == sum(expected.values()))
        stats = receiver.stats()
        for reason, count in expected.items():
            assert stats[f"buffer/dropped/{reason}"] == count, reason
        assert stats["buffer/dropped/internal_error"] == 0
        assert stats["buffer/accepted"] == 1 and stats["buffer/inserts"] == 1 and len(buf) == 1

        # A frame above MAXMSGSIZE: libzmq cuts the connection; nothing reaches the buffer.
        client.send_multipart([raw(good)[0], b"\x00" * (2 * limit)])
        assert wait_for(lambda: receiver.stats()["buffer/peer_disconnects"] >= 1)
        # The peer reconnects and valid messages are accepted again.
        for seq in range(1, 6):
            client.send_multipart(raw(valid_frames(seq, "jpeg" if seq % 2 else "raw")))
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 6)
        stats = receiver.stats()
        assert stats["buffer/rearms"] >= 1  # libzmq gave up on that connection; the receiver re-made it
        assert receiver.is_alive()
        assert stats["buffer/received"] == 2 + len(hostile) + 1 + 5
        assert stats["buffer/seq_gaps"] == 0
    assert not receiver.is_alive()
    seen = {buf.sample(0).header["seq"] for _ in range(200)}
    assert seen == {0, 1, 2, 3, 4, 5}


def test_a_message_of_many_samples_counts_each_sample(ctx):
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    client, endpoint = push_bound(ctx)

    def message(seq, k):
        imgs = np.stack([np.full((8, 8, 3), seq + i, np.uint8) for i in range(k)])
        batch = GeneratedBatch(images=imgs, source_keys=[f"k{seq}"] * k,
                               captions=[f"a ring {seq + i}" for i in range(k)], source=np.arange(k), alpha=0.1 * np.arange(k), seed=np.full(k, seq),
                               sample_index=np.zeros(k, np.int64), rho=0.5, model_id="m", mode="transport", steps=5,
                               inversion_steps=5, guidance=1.0)
        return raw(encode_message(batch, "p", 9, seq))

    with Receiver(StreamConfig(), buf, endpoints=[endpoint]) as receiver:
        client.send_multipart(message(0, 4))  # samples 0..3
        client.send_multipart(message(6, 2))  # samples 6, 7: 4 and 5 lost
        client.send_multipart(message(2, 3))  # a replay of old numbers
        assert wait_for(lambda: receiver.stats()["buffer/dropped"] == 1)
        stats = receiver.stats()
    assert stats["buffer/accepted"] == 6 == len(buf) and stats["buffer/received"] == 3
    assert stats["buffer/received_samples"] == 9 and stats["buffer/dropped/duplicate"] == 1
    assert stats["buffer/seq_gaps"] == 2
    by_seq = {}
    while (s := buf.sample(0)) is not None and len(by_seq) < 6:
        by_seq[s.header["seq"]] = s
    assert sorted(by_seq) == [0, 1, 2, 3, 6, 7]
    assert all(s.caption == f"a ring {q}" and s.image[0, 0, 0] == q for q, s in by_seq.items())


def test_no_sequence_number_a_peer_sends_silences_its_session(ctx):
    """One hostile seq = 2**63 - 1 on a live session, then the valid stream: nothing valid is lost.
    A mark pushed ahead within the window costs the stream at most seq_resync_after messages."""
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    client, endpoint = push_bound(ctx)
    cfg = StreamConfig(seq_window=1000, seq_resync_after=3)
    with Receiver(cfg, buf, endpoints=[endpoint]) as receiver:
        client.send_multipart(raw(valid_frames(0)))
        client.send_multipart(header_with(valid_frames(1), seq=2**63 - 1))  # hostile: far out of window
        for seq in range(1, 6):
            client.send_multipart(raw(valid_frames(seq)))
        assert wait_for(lambda: receiver.stats()["buffer/received"] == 7)
        stats = receiver.stats()
        assert stats["buffer/accepted"] == 6 and stats["buffer/dropped/seq_out_of_window"] == 1
        assert stats["buffer/dropped"] == 1 and stats["buffer/seq_gaps"] == 0 and stats["buffer/seq_resyncs"] == 0

        client.send_multipart(header_with(valid_frames(6), seq=5 + 1000))  # in window: moves the mark to 1005
        for seq in range(7, 13):  # the valid stream goes on: 3 refused as duplicates, then re-anchored
            client.send_multipart(raw(valid_frames(seq)))
        assert wait_for(lambda: receiver.stats()["buffer/received"] == 14)
        stats = receiver.stats()
    assert stats["buffer/dropped/duplicate"] == 3 and stats["buffer/seq_resyncs"] == 1
    assert stats["buffer/accepted"] == 6 + 1 + 3  # seq 10, 11, 12 after the re-anchor
    # every received message was accepted or dropped under exactly one reason
    assert stats["buffer/received"] == stats["buffer/accepted"] + stats["buffer/dropped"]
    assert stats["buffer/dropped"] == sum(v for k, v in stats.items() if k.startswith("buffer/dropped/"))


def test_curve_accepts_allowed_keys_only(ctx, tmp_path):
    keys = generate_keys(tmp_path / "keys", ["producer-0"])
    stranger = generate_keys(tmp_path / "stranger", ["producer-x"], allow=False)
    cfg = StreamConfig(
        curve=True,
        curve_server_secret=str(keys["receiver_secret"]),
        curve_allow_dir=str(keys["allowed"]),
    )
    allowed, ep_allowed = push_bound(ctx, lambda s: make_curve_client(s, keys["producer:producer-0"], keys["receiver"]))
    # The right server key, but a key pair that is not on the allow-list.
    unknown, ep_unknown = push_bound(ctx, lambda s: make_curve_client(s, stranger["producer:producer-x"], keys["receiver"]))
    plain, ep_plain = push_bound(ctx)  # no CURVE at all
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0))
    with Receiver(cfg, buf, endpoints=[ep_allowed, ep_unknown, ep_plain]) as receiver:
        for seq in range(3):
            assert send_bounded(allowed, valid_frames(seq, producer_id="allowed"), 10.0)[0]
        assert wait_for(lambda: receiver.stats()["buffer/auth_failures"] >= 1)
        for seq in range(3):  # never connected: nowhere to send
            assert not send_bounded(unknown, valid_frames(seq, producer_id="unknown"), 0.2)[0]
            assert not send_bounded(plain, valid_frames(seq, producer_id="plain"), 0.2)[0]
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 3)
        time.sleep(0.3)
        stats = receiver.stats()
    assert stats["buffer/accepted"] == 3 and stats["buffer/received"] == 3
    assert {buf.sample(0).header["producer_id"] for _ in range(50)} == {"allowed"}
    with pytest.raises(ValueError, match="curve_allow_dir"):
        StreamConfig(curve=True, curve_server_secret=str(keys["receiver_secret"])).check_curve("receiver")
    with pytest.raises(ValueError, match="secret"):
        Receiver(StreamConfig(curve=True, curve_server_secret=str(keys["receiver"]), curve_allow_dir=str(keys["allowed"])),
                 buf, endpoints=[ep_allowed]).start()


@pytest.mark.parametrize("endpoint", ["tcp://*:5600", "tcp://0.0.0.0:5600", "tcp://10.1.2.3:5600", "tcp://eth0:5600"])
def test_a_stats_endpoint_other_hosts_can_reach_needs_curve(endpoint, tmp_path):
    with pytest.raises(ValueError, match="stats_endpoint"):
        StreamConfig(stats_endpoint=endpoint)
    keys = generate_keys(tmp_path / "keys", ["producer-0"])
    StreamConfig(stats_endpoint=endpoint, curve=True, curve_server_secret=str(keys["receiver_secret"]),
                 curve_allow_dir=str(keys["allowed"]))  # under CURVE it may bind anywhere
    for local in ("tcp://127.0.0.1:*", "tcp://localhost:5600", "tcp://[::1]:5600", "ipc:///tmp/stats-{rank}"):
        StreamConfig(stats_endpoint=local)


def test_under_curve_the_stats_endpoint_answers_allowed_keys_only(ctx, tmp_path, capsys):
    keys = generate_keys(tmp_path / "keys", ["producer-0"])
    stranger = generate_keys(tmp_path / "stranger", ["producer-x"], allow=False)
    cfg = StreamConfig(endpoints=["tcp://127.0.0.1:*"], producers_bind=False, stats_endpoint="tcp://127.0.0.1:*",
                       curve=True, curve_server_secret=str(keys["receiver_secret"]), curve_allow_dir=str(keys["allowed"]))
    buf = ReplayBuffer(BufferConfig(capacity=10, min_size_to_sample=1, samples_per_insert=0))
    with Receiver(cfg, buf) as receiver:
        allowed = dict(curve_client_secret=str(keys["producer:producer-0"]), curve_server_public=str(keys["receiver"]))
        assert monitor.fetch_stats(receiver.stats_endpoint, timeout_s=5, **allowed)["buffer/accepted"] == 0
        with pytest.raises(TimeoutError):  # no CURVE: the handshake never completes
            monitor.fetch_stats(receiver.stats_endpoint, timeout_s=0.5)
        with pytest.raises(TimeoutError):  # a key pair that is not on the allow-list
            monitor.fetch_stats(receiver.stats_endpoint, timeout_s=0.5,
                                curve_client_secret=str(stranger["producer:producer-x"]),
                                curve_server_public=str(keys["receiver"]))
        assert monitor.main(["--endpoint", receiver.stats_endpoint, "--once", "--curve-client-secret",
                             allowed["curve_client_secret"], "--curve-server-public", allowed["curve_server_public"]]) == 0
        assert "size 0/10" in capsys.readouterr().out


def test_receivers_bind_mode_stats_endpoint_and_monitor(ctx, tmp_path, capsys):
    cfg = StreamConfig(endpoints=["tcp://127.0.0.1:*"], producers_bind=False,
                       stats_endpoint="tcp://127.0.0.1:*")
    buf = ReplayBuffer(BufferConfig(capacity=10, min_size_to_sample=2, samples_per_insert=0))
    with Receiver(cfg, buf) as receiver:
        producer_cfg = StreamConfig(endpoints=receiver.bound_endpoints, producers_bind=False, encoding="jpeg")
        sock = open_producer_socket(ctx, producer_cfg, 0)
        img = np.full((16, 16, 3), 90, np.uint8)
        for seq in (0, 1, 4):  # seq 2, 3 lost
            sample = GeneratedBatch.single(img, "k", "a ring", alpha=0.0, seed=1, model_id="m", rho=0.5)
            frames = encode_message(sample, "p", 5, seq, {"producer/samples_per_s": 2.5}, "jpeg")
            assert send_bounded(sock, frames, 10.0)[0]
        assert wait_for(lambda: receiver.stats()["buffer/accepted"] == 3)
        assert receiver.stats()["buffer/seq_gaps"] == 2
        assert receiver.producer_stats() == {"producer/samples_per_s": 2.5, "producer/active": 1}
        snapshot = monitor.fetch_stats(receiver.stats_endpoint, timeout_s=5)
        assert snapshot["buffer/size"] == 3 and snapshot["producer/samples_per_s"] == 2.5
        assert monitor.main(["--endpoint", receiver.stats_endpoint, "--once"]) == 0
        assert "size 3/10" in capsys.readouterr().out
        sock.close()
    log = tmp_path / "metrics" / "trainer0.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n"
                   + json.dumps({"step": 2, **snapshot}) + "\n" + '{"step": 3, "buffer/si')  # a line being written
    assert monitor.read_latest(log)["step"] == 2
    assert monitor.main(["--run-dir", str(tmp_path), "--once"]) == 0
    out = capsys.readouterr().out
    assert "size 3/10" in out and "seq gaps 2" in out
    with pytest.raises(TimeoutError):
        monitor.fetch_stats(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2)


def test_stats_requests_are_answered_while_messages_flow(ctx):
    # The receiver blocks on its data socket; a steady stream must not starve the stats socket.
    cfg = StreamConfig(stats_endpoint="tcp://127.0.0.1:*")
    client, endpoint = push_bound(ctx)
    stop = threading.Event()

    def flood():
        seq = 0
        while not stop.is_set():
            client.send_multipart(raw(valid_frames(seq)))
            seq += 1

    with Receiver(cfg, ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=1, samples_per_insert=0)), endpoints=[endpoint]) as receiver:
        sender = threading.Thread(target=flood)
        sender.start()
        try:
            assert wait_for(lambda: receiver.accepted > 0)
            seen = [monitor.fetch_stats(receiver.stats_endpoint, timeout_s=2)["buffer/accepted"] for _ in range(5)]
        finally:
            stop.set()
            sender.join(10)
    assert seen == sorted(seen) and seen[-1] > seen[0]  # answered during the flood, not after it
    assert receiver.stats()["buffer/stats_requests"] == 5 and receiver.stats()["buffer/dropped"] == 0


def test_two_producer_processes_into_two_receiver_processes():
    n = 48  # 12 messages per producer: a receiver that connects a little late still gets a share
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    results, stop = SPAWN.Queue(), SPAWN.Event()
    receivers = [SPAWN.Process(target=receiver_main, args=(endpoints, results, stop)) for _ in range(2)]
    producers = [SPAWN.Process(target=producer_main, args=(endpoints[r], r, 2, n)) for r in range(2)]
    try:
        for p in receivers + producers:
            p.start()
        for p in producers:
            p.join(120)
            assert p.exitcode == 0
        stop.set()
        outcomes = [results.get(timeout=60) for _ in receivers]
    finally:
        for p in receivers + producers:
            if p.is_alive():
                p.kill()
            p.join(10)
    all_ids = [i for ids, _, _ in outcomes for i in ids]
    # Every sample reached exactly one receiver; none was lost (buffers had room).
    assert len(all_ids) == len(set(all_ids)) == 2 * n
    by_producer = {}
    for pid, session, seq in all_ids:
        by_producer.setdefault((pid, session), []).append(seq)
    assert sorted(pid for pid, _ in by_producer) == ["producer-0", "producer-1"]
    assert all(sorted(seqs) == list(range(n)) for seqs in by_producer.values())
    for ids, stats, producer_stats in outcomes:
        assert ids, "PUSH load-balances: each receiver gets a share"
        assert stats["buffer/accepted"] == len(ids) and stats["buffer/dropped"] == 0
        # Gaps: the sequence numbers of each producer this receiver did not see (they went to the other).
        gaps = 0
        for key in {(p, s) for p, s, _ in ids}:
            seqs = sorted(q for p, s, q in ids if (p, s) == key)
            gaps += seqs[-1] - seqs[0] + 1 - len(seqs)
        assert stats["buffer/seq_gaps"] == gaps
        # stats_every=1: every message forwards its producer's metrics as they were when it was encoded,
        # so the latest a receiver holds per producer counts the samples sent before its last message
        # (whose first sample's number is exactly that count); each message is one batch of k samples.
        k, rest = divmod(len(ids), stats["buffer/received"])
        last = {pid: max(q for p, _, q in ids if p == pid) for pid, _, _ in ids}
        assert rest == 0 and producer_stats["producer/active"] == len(last)
        assert producer_stats["producer/sent"] == sum(q - (k - 1) for q in last.values())


def test_killed_producer_then_restart_is_received_again_and_sigterm_exits_cleanly():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    buf = ReplayBuffer(BufferConfig(capacity=1000, min_size_to_sample=1, samples_per_insert=0))
    procs = []
    with Receiver(StreamConfig(endpoints=[endpoint]), buf) as receiver:
        try:
            first = SPAWN.Process(target=producer_main, args=(endpoint, 0, 1, 0))
            procs.append(first)
            first.start()
            assert wait_for(lambda: receiver.stats()["buffer/accepted"] >= 4, timeout_s=120)
            os.kill(first.pid, signal.SIGKILL)
            first.join(10)
            assert first.exitcode == -signal.SIGKILL
            before = receiver.stats()["buffer/accepted"]
            # The trainer keeps being served from its buffer while no producer runs.
            assert all(buf.sample(0) is not None for _ in range(50))
            second = SPAWN.Process(target=producer_main, args=(endpoint, 0, 1, 0))
            procs.append(second)
            second.start()
            assert wait_for(lambda: receiver.stats()["buffer/sessions"] == 2, timeout_s=120)
            assert wait_for(lambda: receiver.stats()["buffer/accepted"] >= before + 4, timeout_s=60)
            os.kill(second.pid, signal.SIGTERM)
            second.join(30)
            assert second.exitcode == 0  # finished its message, closed its socket, exited 0
            time.sleep(0.5)
            stats = receiver.stats()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)
    assert receiver.is_alive() is False
    assert stats["buffer/dropped"] == 0 and stats["buffer/seq_gaps"] == 0
    sessions = {}
    for _ in range(3000):
        s = buf.sample(0)
        sessions.setdefault(s.header["session"], set()).add(s.header["seq"])
    assert len(sessions) == 2
    assert all(seqs == set(range(max(seqs) + 1)) for seqs in sessions.values())  # contiguous from 0


def test_receiver_stops_promptly_and_validates_config():
    buf = ReplayBuffer(BufferConfig(min_size_to_sample=1, samples_per_insert=0))
    receiver = Receiver(StreamConfig(endpoints=[f"tcp://127.0.0.1:{free_port()}"], poll_timeout_ms=50), buf).start()
    receiver.stop(timeout_s=120)  # returns as soon as the thread ended: within a poll, and a drain of one
    assert not receiver.is_alive()
    for kwargs, name in [
        (dict(endpoints=[]), "endpoints"),
        (dict(encoding="png"), "encoding"),
        (dict(sndhwm=0), "sndhwm"),
        (dict(samples_per_message=300), "samples_per_message must be <= limits.max_samples_per_message=256"),
        (dict(quality=0), "quality"),
    ]:
        with pytest.raises(ValueError, match=name):
            StreamConfig(**kwargs)


def test_tune_malloc_applies_once_per_process(caplog):
    from edsam_online.allocator import MallocSettings, tune_malloc

    assert tune_malloc()  # glibc (Linux CI): mallopt accepted every setting
    assert tune_malloc()  # idempotent
    with caplog.at_level("WARNING"):
        assert tune_malloc(MallocSettings(arena_max=2))
    assert "already tuned" in caplog.text


def test_memory_metrics_follow_an_allocation_and_its_release():
    from edsam_online.allocator import memory_metrics

    before = memory_metrics()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB through malloc: from freed heap memory or a new mapping
    held = memory_metrics()
    del block
    after = memory_metrics()
    key = "memory/malloc_in_use_mib"  # glibc (Linux CI)
    assert held[key] - before[key] == pytest.approx(64, abs=2) and after[key] == pytest.approx(before[key], abs=2)
    for m in (before, held, after):
        assert 0 < m[key] <= m["memory/malloc_held_mib"] and m["memory/rss_mib"] > 0
    assert held["memory/rss_mib"] >= 64  # the block's pages were written


def test_the_sequence_tracker_counts_gaps_and_refuses_replays_and_jumps_then_resyncs():
    from edsam_online.sequence import SequenceTracker

    t = SequenceTracker(window=100, resync_after=2, max_sessions=2)
    first = t.observe("a", 0, 4)  # samples 0..3
    assert first.refused is None and first.new_session and first.mark is None
    assert t.observe("a", 6, 2).gaps == 2  # 4 and 5 never came
    assert t.observe("a", 7, 1).refused == "duplicate"  # at or below the mark (7)
    assert t.observe("a", 500, 1).refused == "seq_out_of_window"  # the mark stays at 7
    resync = t.observe("a", 3, 1)  # after 2 refusals in a row: re-anchored, no gap counted
    assert resync.refused is None and resync.resynced and resync.gaps == 0 and resync.mark == 7
    assert t.observe("a", 4, 1).gaps == 0  # the stream goes on from its new anchor
    t.observe("b", 0, 1)
    t.observe("c", 0, 1)  # a third session forgets the oldest ("a")
    assert len(t) == 2 and t.observe("a", 100, 1).new_session
