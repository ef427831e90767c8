"""The feedback wire: trainer ranks tell a producer how hard its samples were.

One ZeroMQ frame of msgpack (never pickle), sent by a trainer rank to the producer that made
the samples it reports. Each entry names a sample the way the forward wire did (the
producer's ``session`` and the sample's ``seq``; :mod:`edsam_online.wire`) and carries the
trainer's own contrastive loss on it (Eq. 11's second term, per row, from the logits the
step computed anyway) and the model step at which it was measured.

=================  =======  =====================================================
``v``              int      :data:`FEEDBACK_VERSION`
``trainer``        str      the sending rank's name ("trainer-0")
``trainer_session`` int     random id of the trainer process (restart = new)
``mseq``           int      per-trainer-session message number, >= 0, increasing
``step``           int      trainer step when sent
``session``        int      the producer session the entries are about
``seq_base``       int      the smallest sample number of the entries, in [0, 2^62)
``seq``            bin      K little-endian <u4: each sample's number minus ``seq_base``
``loss``           bin      K <f4: the trainer's loss on it
``model_step``     bin      K <u4: the model step of that loss
=================  =======  =====================================================

12 bytes an entry: a sample reported by every draw costs, at paper scale, under 1% of its
bytes in the forward stream (``bench/bench_feedback.py``).

A producer trusts none of it beyond the sample numbers: :class:`FeedbackLedger` joins each
entry with the alpha and fidelity score the producer itself recorded when it sent the
sample, and drops (and counts) entries for other sessions, samples it no longer remembers,
values out of range, replayed messages and samples already reported ``max_reports`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from edsam_online.validation import require_at_least, require_positive

FEEDBACK_VERSION = 1
#: Why a feedback message (``message``) or entry (``entry``) was dropped: ``feedback/dropped/<reason>``.
DROP_REASONS = (
    "undecodable",  # message: not msgpack, not a map, or too large
    "bad_version",  # message
    "bad_field",  # message: a field missing or of the wrong type
    "bad_count",  # message: columns of different lengths, none, or more than max_entries
    "replay",  # message: its mseq is not above the last one from that trainer session
    "unknown_session",  # message: about another producer session (a restart's old samples)
    "unknown_sample",  # entry: not sent by this session, or sent too long ago to remember
    "bad_value",  # entry: a loss that is not finite, negative or above max_loss; a negative model step
    "over_reported",  # entry: the sample was already reported max_reports times
)
_FIELDS = {"trainer": str, "trainer_session": int, "mseq": int, "step": int, "session": int, "seq_base": int}
_COLUMNS = {"seq": np.dtype("<u4"), "loss": np.dtype("<f4"), "model_step": np.dtype("<u4")}
_MAX_SEQ = 2**62
_MAX_NAME = 256


class FeedbackError(ValueError):
    """A feedback message a producer drops; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Feedback:
    """One decoded feedback message: ``seq`` (absolute sample numbers) and ``model_step`` as
    int64 arrays, ``loss`` a read-only float32 array, all of one length."""

    trainer: str
    trainer_session: int
    mseq: int
    step: int
    session: int
    seq: np.ndarray
    loss: np.ndarray
    model_step: np.ndarray


def encode_feedback(trainer: str, trainer_session: int, mseq: int, step: int, session: int,
                    seq: np.ndarray, loss: np.ndarray, model_step: np.ndarray) -> bytes:
    """One feedback message (the module docstring's schema). Raises ValueError for columns of
    different lengths, sample numbers 2^32 or more apart, or a negative model step."""
    seq, model_step = np.asarray(seq, dtype=np.int64), np.asarray(model_step, dtype=np.int64)
    if not len(seq) == len(loss) == len(model_step) or not len(seq):
        raise ValueError("seq, loss and model_step must have the same, non-zero length")
    base = int(seq.min())
    if base < 0 or int(seq.max()) - base >= 2**32 or model_step.min() < 0 or model_step.max() >= 2**32:
        raise ValueError("sample numbers must be >= 0 and less than 2^32 apart; model steps in [0, 2^32)")
    columns = {name: np.ascontiguousarray(values, dtype=dtype).tobytes()
               for (name, dtype), values in zip(_COLUMNS.items(), (seq - base, loss, model_step))}
    return msgpack.packb({"v": FEEDBACK_VERSION, "trainer": trainer, "trainer_session": int(trainer_session),
                          "mseq": int(mseq), "step": int(step), "session": int(session), "seq_base": base,
                          **columns})


def decode_feedback(data: bytes | memoryview, max_entries: int) -> Feedback:
    """Validate and decode one message; raises :class:`FeedbackError` naming the reason."""
    limit = 256 + max_entries * sum(d.itemsize for d in _COLUMNS.values()) + _MAX_NAME
    if len(data) > limit:
        raise FeedbackError("undecodable", f"{len(data)} bytes, more than {limit}")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=limit, max_str_len=_MAX_NAME,
                                 max_array_len=0, max_map_len=16)
    except Exception as err:  # msgpack raises several types for garbage
        raise FeedbackError("undecodable", f"not a msgpack message ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise FeedbackError("undecodable", f"not a map but {type(header).__name__}")
    if type(header.get("v")) is not int or header["v"] != FEEDBACK_VERSION:
        raise FeedbackError("bad_version", f"version {header.get('v')!r}, expected {FEEDBACK_VERSION}")
    for name, kind in _FIELDS.items():
        if type(header.get(name)) is not kind:
            raise FeedbackError("bad_field", f"{name} must be {kind.__name__}, got {type(header.get(name)).__name__}")
    if header["mseq"] < 0 or not header["trainer"] or not 0 <= header["seq_base"] < _MAX_SEQ:
        raise FeedbackError("bad_field", "mseq must be >= 0, trainer non-empty and seq_base in [0, 2^62)")
    columns = {}
    for name, dtype in _COLUMNS.items():
        raw = header.get(name)
        if type(raw) is not bytes or len(raw) % dtype.itemsize:
            raise FeedbackError("bad_field", f"{name} must be a bin of {dtype.str} values")
        columns[name] = np.frombuffer(raw, dtype=dtype)
    lengths = {len(v) for v in columns.values()}
    k = lengths.pop()
    if lengths or not 1 <= k <= max_entries:
        raise FeedbackError("bad_count", f"columns of lengths {sorted({len(v) for v in columns.values()})}, "
                                         f"expected one length in [1, {max_entries}]")
    return Feedback(header["trainer"], header["trainer_session"], header["mseq"], header["step"],
                    header["session"], seq=header["seq_base"] + columns["seq"].astype(np.int64),
                    loss=columns["loss"], model_step=columns["model_step"].astype(np.int64))


@dataclass
class FeedbackConfig:
    """The feedback channel (Hydra key ``feedback``), read by trainers and producers alike.

    Trainers send what they measured every ``every_steps`` steps, in messages of at most
    ``max_entries`` entries, through a queue of ``sndhwm`` messages per producer that never
    blocks a step (a full queue drops the message and counts it). A producer remembers its
    latest ``ledger_size`` samples to match feedback to (a sample reported later, e.g. after a
    long stay in a replay buffer, counts as ``unknown_sample``) and counts at most
    ``max_reports`` reports of one sample (a replay buffer draws a sample
    ``buffer.samples_per_insert`` times on average, at most ``buffer.max_times_sampled``); a
    loss above ``max_loss`` is not a contrastive loss of a batch this model can have (``log``
    of its size is far below) and counts as ``bad_value``."""

    every_steps: int = 5
    max_entries: int = 4096
    sndhwm: int = 4
    ledger_size: int = 65536
    max_reports: int = 64
    max_loss: float = 100.0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "every_steps", "max_entries", "sndhwm", "ledger_size", "max_reports")
        require_positive(self, "max_loss")


class FeedbackLedger:
    """The producer's record of its latest ``ledger_size`` samples (alpha and fidelity score, by
    ``seq``), and the check of every feedback entry against it (module docstring)."""

    def __init__(self, session: int, cfg: FeedbackConfig):
        self.session, self.cfg = session, cfg
        self._seq = np.full(cfg.ledger_size, -1, dtype=np.int64)
        self._alpha = np.zeros(cfg.ledger_size, dtype=np.float64)
        self._score = np.full(cfg.ledger_size, np.nan, dtype=np.float64)
        self._reports = np.zeros(cfg.ledger_size, dtype=np.int64)
        self._last_mseq: dict[tuple[str, int], int] = {}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.applied = 0

    def record(self, first_seq: int, alpha: np.ndarray, score: np.ndarray | None) -> None:
        """Remember samples ``first_seq ...`` as sent, with their alpha and score (None: unscored)."""
        seq = first_seq + np.arange(len(alpha), dtype=np.int64)
        slot = seq % self.cfg.ledger_size
        self._seq[slot], self._alpha[slot], self._reports[slot] = seq, alpha, 0
        self._score[slot] = np.nan if score is None else score

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def join(self, fb: Feedback) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(alpha, score, loss, model_step)`` of ``fb``'s valid entries, from this ledger's
        record; None for a message that is dropped whole. Counts every drop."""
        if fb.session != self.session:
            self.drop("unknown_session")
            return None
        sender = (fb.trainer, fb.trainer_session)
        if fb.mseq <= self._last_mseq.get(sender, -1):
            self.drop("replay")
            return None
        self._last_mseq[sender] = fb.mseq
        seq = fb.seq
        slot = seq % self.cfg.ledger_size
        known = self._seq[slot] == seq  # an empty place holds -1, no sample number
        loss, step = fb.loss.astype(np.float64), fb.model_step
        valid = known & np.isfinite(loss) & (loss >= 0) & (loss <= self.cfg.max_loss) & (step >= 0)
        # a sample named twice in one message counts twice: its k-th mention is fresh only
        # while the sample has had fewer than max_reports - k reports
        fresh = valid & (self._reports[slot] + _mention_number(slot, valid) < self.cfg.max_reports)
        self.drop("unknown_sample", int((~known).sum()))
        self.drop("bad_value", int((known & ~valid).sum()))
        self.drop("over_reported", int((valid & ~fresh).sum()))
        slot = slot[fresh]
        np.add.at(self._reports, slot, 1)
        self.applied += len(slot)
        return self._alpha[slot], self._score[slot], loss[fresh], step[fresh]


def _mention_number(slot: np.ndarray, where: np.ndarray) -> np.ndarray:
    """For each element of ``slot`` with ``where`` set, how many earlier such elements hold
    the same value (0 for its first mention); 0 elsewhere."""
    out = np.zeros(len(slot), dtype=np.int64)
    index = np.flatnonzero(where)
    if len(index):
        order = index[np.argsort(slot[index], kind="stable")]
        values = slot[order]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, len(values)]))
        out[order] = np.arange(len(values)) - group_start
    return out
