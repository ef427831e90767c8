"""The feedback channel's sockets over loopback: reports reach the producer that made the
samples, a trainer never blocks, and under CURVE a producer hears only trainers."""

import time

import numpy as np
import pytest
import zmq

from edsam_online import security
from edsam_online.feedback import FeedbackConfig
from edsam_online.policy import AdversarialConfig, AdversarialPolicy
from edsam_online.steering import (FeedbackSender, ProducerSteering, advertised_endpoint,
                                   feedback_bind_endpoint)


def _steering(session=11, curve=None, **cfg):
    policy = AdversarialPolicy(0.5, AdversarialConfig(min_feedback=1), seed=0)
    return ProducerSteering(policy, FeedbackConfig(**cfg), session, data_endpoint="tcp://127.0.0.1:5555", curve=curve)


def _poll_until(steering, applied, timeout_s=10.0):
    total, deadline = 0, time.monotonic() + timeout_s
    while total < applied and time.monotonic() < deadline:
        total += steering.poll()
        time.sleep(0.01)
    return total


@pytest.mark.parametrize("data, bound", [("tcp://127.0.0.1:5555", "tcp://127.0.0.1:*"), ("tcp://*:5555", "tcp://*:*"),
                                         ("tcp://0.0.0.0:7", "tcp://*:*"), (None, "tcp://*:*"),
                                         ("ipc:///tmp/x.sock", "ipc:///tmp/x.sock.feedback")])
def test_the_feedback_socket_binds_beside_the_data_endpoint(data, bound):
    assert feedback_bind_endpoint(data) == bound


def test_a_wildcard_bind_is_advertised_under_the_host_name():
    import socket

    assert advertised_endpoint("tcp://0.0.0.0:4123") == f"tcp://{socket.gethostname()}:4123"
    assert advertised_endpoint("tcp://127.0.0.1:4123") == "tcp://127.0.0.1:4123"
    assert advertised_endpoint("ipc:///tmp/a.feedback") == "ipc:///tmp/a.feedback"


def test_two_trainers_reports_reach_the_producer_that_made_the_samples():
    a, b = _steering(session=1), _steering(session=2)
    try:
        a.record(0, np.full(4, 0.25), np.ones(4))
        b.record(0, np.full(4, -0.25), np.ones(4))
        senders = [FeedbackSender(f"trainer-{r}", FeedbackConfig()) for r in range(2)]
        for rank, sender in enumerate(senders):  # each trainer drew two samples of each producer
            for seq in (2 * rank, 2 * rank + 1):
                sender.add(a.endpoint, 1, seq, 3.0, 10)
                sender.add(b.endpoint, 2, seq, 1.0, 10)
        time.sleep(0.2)  # the connections complete
        for sender in senders:
            sender.flush(step=12)
        assert _poll_until(a, 4) == 4 and _poll_until(b, 4) == 4
        assert a.ledger.dropped == b.ledger.dropped == dict.fromkeys(a.ledger.dropped, 0)
        assert a.metrics()["feedback/lag_steps"] == 2.0
        # a restarted producer (new session) drops what its predecessor's samples earn
        senders[0].add(b.endpoint, 999, 0, 1.0, 13)
        senders[0].flush(step=14)
        deadline = time.monotonic() + 10
        while b.ledger.dropped["unknown_session"] == 0 and time.monotonic() < deadline:
            b.poll()
            time.sleep(0.01)
        assert b.ledger.dropped["unknown_session"] == 1
        for sender in senders:
            sender.close()
    finally:
        a.close()
        b.close()


def test_a_trainer_never_blocks_on_a_producer_that_is_gone():
    sender = FeedbackSender("trainer-0", FeedbackConfig(sndhwm=1))
    try:
        start = time.monotonic()
        for step in range(20):
            sender.add("tcp://127.0.0.1:1", 5, step, 1.0, step)  # nothing listens there
            sender.flush(step)
        assert time.monotonic() - start < 2.0
        assert sender.send_dropped == 20 and sender.sent == 0
    finally:
        sender.close()


def test_garbage_on_the_feedback_socket_is_counted_and_changes_nothing():
    steering = _steering()
    ctx = zmq.Context()
    try:
        steering.record(0, np.zeros(2), np.ones(2))
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(steering.endpoint)
        for junk in (b"", b"\x00" * 100, b"\x81\xa1v\x01", b"x" * (2 << 20)):
            push.send(junk)
        deadline = time.monotonic() + 10
        while steering.received < 3 and time.monotonic() < deadline:
            steering.poll()
            time.sleep(0.01)
        metrics = steering.metrics()
        assert metrics["feedback/applied"] == 0 and steering.policy.weight.sum() == 0
        # the 2 MB message exceeds the socket's maxmsgsize: libzmq drops the peer, not the producer
        assert metrics["feedback/received"] == 3
        assert metrics["feedback/dropped/undecodable"] == 2 and metrics["feedback/dropped/bad_field"] == 1
    finally:
        ctx.destroy(linger=0)
        steering.close()


def test_under_curve_a_producer_hears_only_trainers_holding_the_receiver_key(tmp_path):
    keys = security.generate_keys(tmp_path / "keys", ["p0"])
    stranger = security.generate_keys(tmp_path / "other", [])
    steering = _steering(curve=(str(keys["producer:p0"]), str(keys["receiver"])))
    try:
        steering.record(0, np.zeros(4), np.ones(4))
        trainer = FeedbackSender("trainer-0", FeedbackConfig(), curve=(str(keys["receiver_secret"]),
                                                                       str(keys["allowed"])))
        impostor = FeedbackSender("trainer-x", FeedbackConfig(), curve=(str(stranger["receiver_secret"]),
                                                                         str(keys["allowed"])))
        for sender, seqs in ((impostor, (0, 1)), (trainer, (2, 3))):
            for seq in seqs:
                sender.add(steering.endpoint, 11, seq, 2.0, 1)
        time.sleep(0.5)
        for sender in (impostor, trainer):
            sender.flush(step=2)
        assert _poll_until(steering, 2) == 2
        time.sleep(0.3)
        assert steering.poll() == 0 and steering.ledger.applied == 2  # the impostor's reports never arrived
        trainer.close()
        impostor.close()
    finally:
        steering.close()


def _stand_in_trainer(buffers, senders, step, peak=0.3):
    """One step of a stand-in trainer per buffer: draw what the buffer holds, read each sample
    through the loader's own preprocessing (its origin), report a loss that peaks at ``peak``."""
    import torch

    from edsam_online.data import DataCounters
    from edsam_online.loader import Drawn, Preprocess

    preprocess = Preprocess(lambda image: torch.zeros(1), lambda captions: [torch.zeros(1)], None, DataCounters())
    for buf, sender in zip(buffers, senders):
        while (drawn := buf.sample_with_step(0)) is not None:
            example = preprocess(Drawn(*drawn))
            loss = 2.0 + np.exp(-((example.alpha - peak) ** 2) / (2 * 0.1**2))
            sender.add(example.origin.feedback, example.origin.session, example.origin.seq, loss, step)
        sender.flush(step)


def test_two_producers_times_two_trainers_close_the_loop_and_a_restarted_producer_keeps_its_policy(tmp_path):
    """Each trainer's reports reach the producer that made the sample; a producer restarted on
    the run folder (launch.sh after a crash, a resumed run) goes on with the policy it had
    learned, under a new session that hears nothing of the old one's feedback."""
    from _streaming_helpers import tiny_configs

    import test_producer
    from edsam_online.buffer import BufferConfig, ReplayBuffer
    from edsam_online.diffusion import build_sampler
    from edsam_online.producer import ProducerConfig
    from edsam_online.streaming import Receiver, StreamConfig

    data, sampler_cfg = tiny_configs()
    tiny = (data, build_sampler(sampler_cfg))
    policy = AdversarialConfig(min_feedback=16, lam=0.0)

    def start(rank, seed=0):
        pcfg = ProducerConfig(rank=rank, num_producers=2, batch_size=2, m=2, seed=seed, scorer="attributes",
                              policy="adversarial", adversarial=policy, send_timeout_s=1.0)
        return test_producer.start_producer(tiny, pcfg, StreamConfig(endpoints=["tcp://127.0.0.1:*"] * 2),
                                            scorer=lambda images, captions: np.ones(len(images), np.float32),
                                            run_dir=str(tmp_path))

    producers = [start(0), start(1)]
    buffers = [ReplayBuffer(BufferConfig(capacity=256, min_size_to_sample=1, max_times_sampled=1,
                                         samples_per_insert=0)) for _ in range(2)]
    receivers = [Receiver(StreamConfig(endpoints=[p[1] for p in producers]), buf, rank=r).start()
                 for r, buf in enumerate(buffers)]
    senders = [FeedbackSender(f"trainer-{r}", FeedbackConfig()) for r in range(2)]
    try:
        steerings = [p[3].steering for p in producers]
        step = 0
        while min(s.ledger.applied for s in steerings) < 200 and step < 2000:
            _stand_in_trainer(buffers, senders, step)
            step += 1
            time.sleep(0.01)
        for s in steerings:  # every report reached the producer that made the sample
            assert s.ledger.applied >= 200 and sum(s.ledger.dropped.values()) == 0
            p = s.policy.probabilities()
            assert p is not None and abs(s.policy.edges[np.argmax(p)] + 0.05 - 0.3) <= 0.15  # steered to the peak
        # restart producer 1: a new session binds a new feedback endpoint
        old = producers[1]
        old[3].stop()
        old[0].join(30)
        restarted = start(1, seed=1)
        learned, restored = old[3].steering.policy, restarted[3].steering.policy
        assert (tmp_path / "policy" / "producer1.msgpack").exists()
        assert restored.applied == learned.applied >= 200  # before any feedback of its own
        np.testing.assert_array_equal(restored.probabilities(), learned.probabilities())
        applied_before = restored.applied
        receivers[0].stop(), receivers[1].stop()
        receivers = [Receiver(StreamConfig(endpoints=[producers[0][1], restarted[1]]), buf, rank=r).start()
                     for r, buf in enumerate(buffers)]
        producers[1] = restarted
        before = steerings[0].ledger.applied
        step_0 = step
        while restarted[3].steering.ledger.applied < 50 and step < step_0 + 2000:
            _stand_in_trainer(buffers, senders, step)
            step += 1
            time.sleep(0.01)
        assert restarted[3].steering.ledger.applied >= 50  # the new session is found through its samples
        assert restored.applied >= applied_before + 50
        assert sum(restarted[3].steering.ledger.dropped.values()) == 0  # and hears nothing of the old one's
        assert steerings[0].ledger.applied > before and sum(steerings[0].ledger.dropped.values()) == 0
    finally:
        for p in producers:
            p[3].stop()
            p[0].join(30)
        for r in receivers:
            r.stop()
        for s in senders:
            s.close()
