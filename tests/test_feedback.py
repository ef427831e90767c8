"""The feedback wire: what a producer accepts from trainers, and what it drops and counts."""

import msgpack
import numpy as np
import pytest

from edsam_online.feedback import (DROP_REASONS, FeedbackError, FeedbackLedger, FeedbackConfig, decode_feedback,
                                   encode_feedback)
from edsam_online.policy import AdversarialConfig, AdversarialPolicy

SESSION = 123456789


def _message(seq=(0, 1, 2), loss=None, model_step=None, mseq=0, session=SESSION, trainer="trainer-0"):
    seq = np.array(list(seq), dtype=np.int64)
    loss = np.arange(1.0, len(seq) + 1) if loss is None else np.array(loss)
    model_step = np.full(len(seq), 5) if model_step is None else np.array(model_step)
    return encode_feedback(trainer, 77, mseq, 9, session, seq, loss, model_step)


def _ledger(n=8, **kw):
    ledger = FeedbackLedger(SESSION, FeedbackConfig(**kw))
    ledger.record(0, np.linspace(-0.5, 0.5, n), np.ones(n))
    return ledger


def test_a_message_round_trips_and_joins_with_what_the_producer_recorded():
    fb = decode_feedback(_message(model_step=(5, 5, 6)), max_entries=16)
    assert (fb.trainer, fb.trainer_session, fb.mseq, fb.step, fb.session) == ("trainer-0", 77, 0, 9, SESSION)
    assert fb.seq.tolist() == [0, 1, 2] and fb.loss.tolist() == [1.0, 2.0, 3.0] and fb.model_step.tolist() == [5, 5, 6]
    ledger = _ledger()
    ledger.record(3, np.array([0.25]), None)  # an unscored sample
    alpha, score, loss, step = ledger.join(decode_feedback(_message(seq=(1, 3), loss=(2.0, 4.0),
                                                                    model_step=(5, 6)), 16))
    assert alpha.tolist() == pytest.approx([-0.5 + 1 / 7, 0.25]) and loss.tolist() == [2.0, 4.0]
    assert score[0] == 1.0 and np.isnan(score[1]) and step.tolist() == [5, 6]
    assert ledger.applied == 2 and sum(ledger.dropped.values()) == 0


def _garbage():
    valid = msgpack.unpackb(_message())
    return [
        ("undecodable", b"\xc1\xff\x00"),
        ("undecodable", msgpack.packb([1, 2, 3])),
        ("undecodable", msgpack.packb("feedback")),
        ("undecodable", b"x" * 10_000_000),
        ("bad_version", msgpack.packb({**valid, "v": 99})),
        ("bad_version", msgpack.packb({**valid, "v": True})),
        ("bad_field", msgpack.packb({k: v for k, v in valid.items() if k != "session"})),
        ("bad_field", msgpack.packb({**valid, "session": "123"})),
        ("bad_field", msgpack.packb({**valid, "mseq": True})),
        ("bad_field", msgpack.packb({**valid, "mseq": -1})),
        ("bad_field", msgpack.packb({**valid, "trainer": ""})),
        ("bad_field", msgpack.packb({**valid, "seq_base": -1})),
        ("bad_field", msgpack.packb({**valid, "seq_base": 2**63})),
        ("undecodable", msgpack.packb({**valid, "loss": [1.0, 2.0, 3.0]})),  # no list is in the schema
        ("bad_field", msgpack.packb({**valid, "seq": b"\x00" * 7})),
        ("bad_count", msgpack.packb({**valid, "loss": np.ones(2, "<f4").tobytes()})),
        ("bad_count", msgpack.packb({**valid, "seq": b"", "loss": b"", "model_step": b""})),
        ("bad_count", _message(seq=range(17), loss=np.ones(17), model_step=np.zeros(17))),
    ]


@pytest.mark.parametrize("reason, data", _garbage())
def test_a_malformed_message_is_refused_naming_the_reason(reason, data):
    with pytest.raises(FeedbackError) as err:
        decode_feedback(data, max_entries=16)
    assert err.value.reason == reason and reason in DROP_REASONS


def test_hostile_feedback_changes_no_decision_and_every_drop_is_counted():
    honest = [_message(seq=range(8), loss=np.full(8, 2.0), model_step=np.full(8, 3), mseq=0)]
    hostile = [
        *(data for _, data in _garbage()),
        _message(seq=(0, 1), loss=(np.nan, np.inf), model_step=(3, 3), mseq=1),  # not finite
        _message(seq=(2, 3), loss=(-1.0, 1e9), model_step=(3, 3), mseq=2),  # negative, huge
        _message(seq=(100, 101, 5000), mseq=4),  # samples this producer never sent
        _message(session=SESSION + 1, mseq=5),  # another session (an earlier process)
        honest[0],  # a replay of the honest message
        *(_message(seq=[6] * 3, loss=(50.0,) * 3, model_step=(3,) * 3, mseq=10 + i) for i in range(5)),  # a flood
    ]

    def run(messages):
        ledger, policy = _ledger(max_reports=8), AdversarialPolicy(0.5, AdversarialConfig(min_feedback=1), seed=1)
        for data in messages:
            try:
                joined = ledger.join(decode_feedback(data, max_entries=16))
            except FeedbackError as err:
                ledger.drop(err.reason)
                continue
            if joined is not None:
                policy.update(*joined)
        return ledger, policy

    mixed = run(honest + hostile)
    dropped = mixed[0].dropped
    assert dropped["undecodable"] == 5 and dropped["bad_version"] == 2 and dropped["bad_count"] == 3
    assert dropped["bad_field"] == 8 and dropped["bad_value"] == 4 and dropped["unknown_sample"] == 3
    assert dropped["unknown_session"] == 1 and dropped["replay"] == 1
    # the flood: sample 6 counts max_reports (8) times in all, its honest report included
    assert dropped["over_reported"] == 15 - 7 and mixed[0].applied == 8 + 7
    # what the flood could move is bounded by max_reports; without it the decisions are the clean ones
    unflooded = run(honest + hostile[:-5])
    assert unflooded[0].applied == 8
    assert np.array_equal(unflooded[1].draw(50), run(honest)[1].draw(50))


def test_a_sample_named_twice_in_one_message_counts_twice_up_to_max_reports():
    ledger = _ledger(max_reports=2)
    alpha, *_ = ledger.join(decode_feedback(_message(seq=(1, 1, 1, 2)), 16))
    assert len(alpha) == 3 and ledger.dropped["over_reported"] == 1


def test_a_sample_sent_longer_ago_than_the_ledger_remembers_is_unknown():
    ledger = _ledger(ledger_size=8)
    ledger.record(8, np.zeros(4), np.ones(4))  # samples 8..11 take the places of 0..3
    assert len(ledger.join(decode_feedback(_message(seq=(0, 3, 4, 11)), 16))[0]) == 2
    assert ledger.dropped["unknown_sample"] == 2


@pytest.mark.parametrize("key, value", [("every_steps", 0), ("max_entries", 0), ("sndhwm", 0), ("ledger_size", 0),
                                        ("max_reports", 0), ("max_loss", float("nan"))])
def test_a_bad_feedback_setting_is_refused_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        FeedbackConfig(**{key: value})


def test_an_entry_costs_12_bytes_and_sample_numbers_travel_as_offsets():
    one, many = (len(_message(seq=range(n))) for n in (1, 1001))
    assert 12 <= (many - one) / 1000 < 12.01  # (a longer msgpack bin header is the rest)
    fb = decode_feedback(_message(seq=(2**40 + 7, 2**40), loss=(1.0, 2.0)), 16)
    assert fb.seq.tolist() == [2**40 + 7, 2**40]
    with pytest.raises(ValueError, match="2\\^32"):
        _message(seq=(0, 2**32))
    with pytest.raises(ValueError, match="model steps"):
        _message(seq=(0,), model_step=(-1,))
