"""Bounded replay buffer for synthetic samples, with Reverb's table semantics.

A Reverb table (DeepMind) is a sampler + a remover + a rate limiter. Here:
uniform sampling with replacement, FIFO eviction at ``capacity``, retirement
after ``max_times_sampled`` uses, and Reverb's ``SampleToInsertRatio``
limiter (``min_size_to_sample``, ``samples_per_insert``, ``error_buffer``).
Reverb itself is a TensorFlow gRPC server with no wheels for this stack, and
no pure-Python library offers these semantics behind a thread-safe in-process
API, so this is written by hand (~300 lines).

One deliberate difference from Reverb: inserts never block. Reverb blocks an
insert when the sample side lags by more than ``error_buffer``; here the
receiver must keep draining its socket (to count hostile input and stop
promptly), and a lagging trainer is better served by fresh samples than by a
stalled producer. So an insert beyond the limiter's upper bound is accepted
and the excess sample credit is forgiven (``buffer/credit_forgiven``), which
keeps the guarantee that matters: samples never exceed
``samples_per_insert * inserts - min_diff`` (reuse stays capped when
producers lag), and a long trainer stall cannot bank unbounded reuse.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Generic, Sequence, TypeVar

import numpy as np

from edsam_online.validation import require_at_least

T = TypeVar("T")

_REUSE_BINS = 8  # buffer/reuse_hist/0 .. /7, then /ge8
_AGE_WINDOW = 1024  # sampled-item ages kept for the age statistics
_RATE_WINDOW_S = 10.0
_EXCLUDE_TRIES = 64  # draws a sample(exclude=...) makes before it reports that it cannot serve
#: The table's counters (``ReplayBuffer._<name>``) a :class:`BufferSnapshot` carries: the
#: limiter's (inserts, samples, forgiven credit) and those behind :meth:`ReplayBuffer.stats`.
COUNTERS = ("inserts", "samples", "forgiven", "evicted", "evicted_never_sampled", "retired", "starved",
            "starved_min_size", "starved_rate", "excluded_draws", "starved_exclude", "reused")


@dataclass
class BufferConfig:
    """Replay buffer settings of one trainer rank (Hydra key ``buffer``).

    ``samples_per_insert`` is the average number of uses per inserted sample the
    limiter allows; 0 disables the ratio limiter (only ``min_size_to_sample`` gates
    sampling). ``error_buffer`` is Reverb's: sampling blocks when
    ``inserts * samples_per_insert - samples`` would fall below
    ``samples_per_insert * min_size_to_sample - error_buffer``; ``None`` means
    ``max(1, samples_per_insert)``, the smallest margin that cannot deadlock. A trainer
    samples in bursts of one synthetic batch per step, so the margin must exceed a few
    such batches, or the limiter starves every step after its first few samples (hence
    the default of 512). ``max_times_sampled = 0`` means unlimited reuse.
    ``sample_timeout_s`` is the bounded wait of :meth:`ReplayBuffer.sample` when called
    without a timeout. ``distinct_sources``: the trainer's synthetic slot takes at most one
    sample per source key (the M samples of one source image share its caption: two of
    them in one contrastive batch are false negatives of each other).
    """

    capacity: int = 4096
    min_size_to_sample: int = 64
    max_times_sampled: int = 0
    samples_per_insert: float = 4.0
    error_buffer: float | None = 512.0
    sample_timeout_s: float = 0.05
    distinct_sources: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "capacity")
        if not 1 <= self.min_size_to_sample <= self.capacity:
            raise ValueError(f"min_size_to_sample must be in [1, capacity={self.capacity}], got {self.min_size_to_sample}")
        require_at_least(self, 0, "max_times_sampled")
        require_at_least(self, 0, "samples_per_insert")
        if self.error_buffer is None:
            self.error_buffer = max(1.0, float(self.samples_per_insert))
        if self.samples_per_insert > 0 and self.error_buffer < max(1.0, self.samples_per_insert):
            raise ValueError(
                f"error_buffer must be >= max(1, samples_per_insert)={max(1.0, self.samples_per_insert)} "
                f"(smaller margins can block sampling for good), got {self.error_buffer}"
            )
        require_at_least(self, 0, "sample_timeout_s")


@dataclass
class BufferSnapshot(Generic[T]):
    """A table's state (:meth:`ReplayBuffer.snapshot`, :meth:`ReplayBuffer.restore`): its live
    items oldest first (item i is ``seqs[i][index[i]]``) with their uses, insert step and age in
    seconds, the :data:`COUNTERS`, the reuse histogram of the items that left, the trainer step
    and the sampling RNG's state (``random.Random.getstate()``; None leaves the RNG as it is)."""

    seqs: list[Sequence[T]]
    index: np.ndarray  # int64
    uses: np.ndarray  # int64
    inserted_step: np.ndarray  # int64
    age_s: np.ndarray  # float64
    counters: dict[str, int | float]
    reuse_hist: np.ndarray  # int64 [_REUSE_BINS + 1]
    step: int = 0
    rng_state: tuple | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def check(self) -> None:
        """Raise ValueError unless this can be a table's state (one read from a file may not be)."""
        n = len(self.seqs)
        for name, dtype, size in (("index", np.int64, n), ("uses", np.int64, n), ("inserted_step", np.int64, n),
                                  ("age_s", np.float64, n), ("reuse_hist", np.int64, _REUSE_BINS + 1)):
            column = getattr(self, name)
            if not isinstance(column, np.ndarray) or column.dtype != dtype or column.shape != (size,):
                raise ValueError(f"{name} must be {size} {np.dtype(dtype).name} values")
            if size and not (np.isfinite(column).all() and column.min() >= 0):
                raise ValueError(f"{name} must hold finite values >= 0")
        if set(self.counters) != set(COUNTERS):
            raise ValueError(f"counters must be {COUNTERS}, got {sorted(self.counters)}")
        for name, value in self.counters.items():
            kinds = (int, float) if name == "forgiven" else (int,)
            if type(value) not in kinds or not math.isfinite(value) or value < 0:
                raise ValueError(f"counter {name} must be a number >= 0, got {value!r}")
        if type(self.step) is not int or self.step < 0:
            raise ValueError(f"step must be an int >= 0, got {self.step!r}")
        if self.rng_state is not None:
            try:
                random.Random().setstate(self.rng_state)
            except (TypeError, ValueError, OverflowError) as err:
                raise ValueError(f"not a random.Random state: {err}") from None


class ReplayBuffer(Generic[T]):
    """Thread-safe bounded table: ``insert`` from the receiver thread, ``sample`` from loaders.

    ``sample(timeout_s)`` returns ``None`` when it cannot serve within the bounded wait
    (too few items, or the rate limiter says reuse is exhausted) and counts it in
    ``buffer/starved``; the loader then fills the slot from real data.

    Storage is column-wise, with no Python object per item: ``insert_many(seq)`` keeps a
    reference to ``seq`` and, per item, its index in ``seq`` plus numpy columns (uses,
    insert time, insert step, live flag) in a window of ``2 * capacity`` slots. Items are
    appended at the window's tail in insertion order, so FIFO eviction advances the head,
    and the window is compacted when the tail reaches its end (at most once per
    ``capacity`` inserts). Retired items leave holes, which uniform sampling skips by
    rejection (the window is compacted when holes make that slow). A received message
    (a :class:`~edsam_online.wire.SampleBatch`) is thus inserted with a handful of numpy
    slice writes, whatever its size; its sample objects are built when sampled.

    ``buffer/bytes`` (in :meth:`stats`) is what the table keeps alive: the ``nbytes`` of
    every inserted sequence with at least one live item (a message's images stay in memory
    until its last sample leaves), so it can exceed ``size`` x item bytes by the partly
    evicted or retired messages. Sequences without ``nbytes`` count 0.

    :meth:`snapshot` and :meth:`restore` carry the table across a trainer restart
    (``checkpoint.buffer``; the file format is :mod:`edsam_online.buffer_snapshot`).
    """

    def __init__(self, cfg: BufferConfig, key: Callable[[T], str] | None = None) -> None:
        self.cfg = cfg
        self._key = key  # an item's source key, for sample(exclude=...)
        self._cond = threading.Condition(threading.Lock())
        self._rng = random.Random(cfg.seed)
        window = 2 * cfg.capacity
        self._seqs: list[Sequence[T] | None] = [None] * window  # the inserted sequence of each slot
        self._index = np.zeros(window, np.int64)  # the item's index in that sequence
        self._uses = np.zeros(window, np.int64)
        self._inserted_at = np.zeros(window, np.float64)
        self._inserted_step = np.zeros(window, np.int64)
        self._live = np.zeros(window, bool)
        self._head = 0  # oldest live slot (or == _tail when empty)
        self._tail = 0  # next free slot
        self._size = 0  # live slots
        self._closed = False
        self._step = 0
        spi = float(cfg.samples_per_insert)
        self._min_diff = spi * cfg.min_size_to_sample - float(cfg.error_buffer)
        self._max_diff = spi * cfg.min_size_to_sample + float(cfg.error_buffer)
        self._inserts = 0
        self._samples = 0
        self._forgiven = 0.0
        self._evicted = 0
        self._evicted_never_sampled = 0
        self._retired = 0
        self._starved = 0
        self._starved_min_size = 0
        self._starved_rate = 0
        self._excluded_draws = 0
        self._starved_exclude = 0
        self._reused = 0  # draws of an item drawn before
        #: What :meth:`restore` added to each counter: where this process's own counts start
        #: (the ledger's baseline, :data:`edsam_online.ledger.RESTORED_PREFIX`).
        self.restored_counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._reuse_hist = np.zeros(_REUSE_BINS + 1, np.int64)
        self._ages_s: collections.deque[float] = collections.deque(maxlen=_AGE_WINDOW)
        self._ages_steps: collections.deque[int] = collections.deque(maxlen=_AGE_WINDOW)
        self._rate_marks: collections.deque[tuple[float, int, int]] = collections.deque([(time.monotonic(), 0, 0)])

    # ------------------------------------------------------------------ limiter

    def _credit(self) -> float:
        return self._inserts * self.cfg.samples_per_insert - self._samples - self._forgiven

    def _can_sample(self) -> str | None:
        """None if a sample may be served now, else why not ("min_size" or "rate")."""
        if self._size < self.cfg.min_size_to_sample:
            return "min_size"
        if self.cfg.samples_per_insert > 0 and self._credit() - 1 < self._min_diff:
            return "rate"
        return None

    def _count_inserts(self, k: int) -> None:
        """Count ``k`` inserts; credit beyond the limiter's upper bound is forgiven (module doc).

        Equal to forgiving after each insert once the table holds more than
        ``min_size_to_sample`` items (before that Reverb lets inserts run free): from
        then on, credit is ``min(credit + samples_per_insert, max_diff)`` per insert, so
        it ends at ``min(credit + k * samples_per_insert, max_diff)``. Call after the
        items are in the table.
        """
        final = self._credit() + k * self.cfg.samples_per_insert
        self._inserts += k
        if self.cfg.samples_per_insert > 0 and self._size > self.cfg.min_size_to_sample and final > self._max_diff:
            self._forgiven += final - self._max_diff

    # ------------------------------------------------------------------ table ops

    def insert(self, value: T) -> None:
        """Add one item, evicting the oldest when full. Never blocks."""
        self.insert_many((value,))

    def insert_many(self, values: Sequence[T]) -> None:
        """Add the items of ``values`` in order under one lock (a received message's samples).
        Never blocks. The buffer keeps a reference to ``values`` and serves ``values[i]``."""
        k = len(values)
        if k == 0:
            return
        now = time.monotonic()
        with self._cond:
            for lo in range(0, k, self.cfg.capacity):  # a sequence longer than the table
                self._insert_range(values, lo, min(k, lo + self.cfg.capacity), now)
            self._mark_rate(now)
            if self._can_sample() is None:
                self._cond.notify_all()

    def _insert_range(self, values: Sequence[T], lo: int, hi: int, now: float) -> None:
        k = hi - lo  # <= capacity
        excess = self._size + k - self.cfg.capacity
        if excess > 0:
            self._evict_oldest(excess)
        if self._tail + k > len(self._live):
            self._compact()  # leaves tail = size <= capacity - k
        a, b = self._tail, self._tail + k
        self._seqs[a:b] = [values] * k
        self._index[a:b] = np.arange(lo, hi)
        self._uses[a:b] = 0
        self._inserted_at[a:b] = now
        self._inserted_step[a:b] = self._step
        self._live[a:b] = True
        self._tail = b
        self._size += k
        self._count_inserts(k)

    def sample(self, timeout_s: float | None = None, exclude: Collection[str] | None = None) -> T | None:
        """One item drawn uniformly, or ``None`` after waiting at most ``timeout_s``
        (``cfg.sample_timeout_s`` when None; 0 = do not wait).

        ``exclude``: source keys the item must not have (needs the buffer's ``key``): the
        draw is uniform over the other items, by rejection; when ``_EXCLUDE_TRIES`` draws
        all hit excluded keys it returns ``None`` at once (``buffer/starved_exclude``)."""
        drawn = self.sample_with_step(timeout_s, exclude)
        return None if drawn is None else drawn[0]

    def sample_with_step(self, timeout_s: float | None = None,
                         exclude: Collection[str] | None = None) -> tuple[T, int] | None:
        """:meth:`sample`, with the trainer step (:meth:`set_step`) at which the item was
        inserted: ``(item, inserted_step)``, or ``None``."""
        timeout = self.cfg.sample_timeout_s if timeout_s is None else timeout_s
        if timeout < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout}")
        if exclude and self._key is None:
            raise ValueError("sample(exclude=...) needs a buffer built with a key function")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                why = self._can_sample()
                if why is None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._starved += 1
                    if why == "min_size":
                        self._starved_min_size += 1
                    else:
                        self._starved_rate += 1
                    return None
                self._cond.wait(remaining)
            if exclude:
                pos, value = self._pick_excluding(exclude)
                if pos is None:
                    self._starved += 1
                    self._starved_exclude += 1
                    return None
            else:
                pos = self._pick()
                value = self._seqs[pos][int(self._index[pos])]
            uses = int(self._uses[pos]) + 1
            self._uses[pos] = uses
            self._samples += 1
            self._reused += uses > 1
            now = time.monotonic()
            self._ages_s.append(now - float(self._inserted_at[pos]))
            inserted_step = int(self._inserted_step[pos])
            self._ages_steps.append(self._step - inserted_step)
            if self.cfg.max_times_sampled and uses >= self.cfg.max_times_sampled:
                self._remove(np.array([pos]), 1)
                self._retired += 1
            self._mark_rate(now)
            return value, inserted_step

    def _pick(self) -> int:
        """A live slot, uniformly: directly when there are no holes, else by rejection
        (expected tries = window span / size); after 8 misses the window is compacted."""
        span = self._tail - self._head
        if span > self._size:
            for _ in range(8):
                pos = self._head + self._rng.randrange(span)
                if self._live[pos]:
                    return pos
            self._compact()
        return self._head + self._rng.randrange(self._size)

    def _pick_excluding(self, exclude: Collection[str]) -> tuple[int, T] | tuple[None, None]:
        """A live slot whose item's key is not in ``exclude`` and that item, or
        ``(None, None)`` after ``_EXCLUDE_TRIES`` misses."""
        for _ in range(_EXCLUDE_TRIES):
            pos = self._pick()
            value = self._seqs[pos][int(self._index[pos])]
            if self._key(value) not in exclude:
                return pos, value
            self._excluded_draws += 1
        return None, None

    def _evict_oldest(self, n: int) -> None:
        head, tail = self._head, self._tail
        if tail - head == self._size:  # no holes: the n oldest are the first n slots
            pos: slice | np.ndarray = slice(head, head + n)
        else:
            pos = head + np.flatnonzero(self._live[head:tail])[:n]
        self._evicted += n
        self._evicted_never_sampled += self._remove(pos, n)

    def _remove(self, pos: slice | np.ndarray, n: int) -> int:
        """Take the ``n`` slots ``pos`` (a run, or ascending indices) out, releasing their
        references, and count their reuse. Returns how many were never sampled."""
        self._live[pos] = False
        if isinstance(pos, slice):
            self._seqs[pos] = [None] * n
        else:
            for p in pos.tolist():
                self._seqs[p] = None
        hist = np.bincount(np.minimum(self._uses[pos], _REUSE_BINS), minlength=_REUSE_BINS + 1)
        self._reuse_hist += hist
        self._size -= n
        if self._size == 0:
            self._head = self._tail = 0
        elif not self._live[self._head]:
            self._head += int(np.argmax(self._live[self._head:self._tail]))
        return int(hist[0])

    def _compact(self) -> None:
        """Move the live slots, in order, to the start of the window."""
        head, tail = self._head, self._tail
        pos = head + np.flatnonzero(self._live[head:tail])
        n = len(pos)
        for column in (self._index, self._uses, self._inserted_at, self._inserted_step):
            column[:n] = column[pos]
        seqs = self._seqs
        seqs[:n] = [seqs[p] for p in pos.tolist()]
        seqs[n:tail] = [None] * (tail - n)
        self._live[:n] = True
        self._live[n:tail] = False
        self._head, self._tail = 0, n

    def _mark_rate(self, now: float) -> None:
        marks = self._rate_marks
        if not marks or now - marks[-1][0] >= 0.25:
            marks.append((now, self._inserts, self._samples))
            while len(marks) > 2 and now - marks[1][0] > _RATE_WINDOW_S:
                marks.popleft()

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> BufferSnapshot[T]:
        """The table now: references to its items, copies of its columns and counters (the
        receiver may go on inserting meanwhile)."""
        now = time.monotonic()
        with self._cond:
            pos = self._head + np.flatnonzero(self._live[self._head:self._tail])
            return BufferSnapshot(
                seqs=[self._seqs[p] for p in pos.tolist()], index=self._index[pos], uses=self._uses[pos],
                inserted_step=self._inserted_step[pos], age_s=now - self._inserted_at[pos],
                counters={name: getattr(self, f"_{name}") for name in COUNTERS}, reuse_hist=self._reuse_hist.copy(),
                step=self._step, rng_state=self._rng.getstate())

    def restore(self, snap: BufferSnapshot[T]) -> int:
        """Put ``snap``'s items back, older than any the table holds, and add its counters and
        reuse histogram to the table's: a fresh table (same config) becomes the one snapshotted,
        down to its limiter and sampling RNG. The oldest items that do not fit are evicted (and
        counted so); returns how many. Credit beyond the limiter's bound is forgiven as after an
        insert (module doc). Raises ValueError, leaving the table as it was, for a snapshot that
        fails :meth:`BufferSnapshot.check`."""
        snap.check()
        n = len(snap)
        now = time.monotonic()
        with self._cond:
            self._compact()
            existing = self._size
            keep = min(n, self.cfg.capacity - existing)
            dropped = n - keep
            self._seqs[keep:keep + existing] = self._seqs[:existing]
            self._seqs[:keep] = snap.seqs[dropped:]
            for column, values in ((self._index, snap.index), (self._uses, snap.uses),
                                   (self._inserted_step, snap.inserted_step), (self._inserted_at, now - snap.age_s)):
                column[keep:keep + existing] = column[:existing].copy()
                column[:keep] = values[dropped:]
            self._live[:keep + existing] = True
            self._head, self._tail, self._size = 0, keep + existing, keep + existing
            for name in COUNTERS:
                setattr(self, f"_{name}", getattr(self, f"_{name}") + snap.counters[name])
                self.restored_counters[name] += snap.counters[name]
            gone = np.bincount(np.minimum(snap.uses[:dropped], _REUSE_BINS), minlength=_REUSE_BINS + 1)
            self._reuse_hist += snap.reuse_hist + gone
            self._evicted += dropped
            self._evicted_never_sampled += int(gone[0])
            self._step = max(self._step, int(snap.step))
            if snap.rng_state is not None:
                self._rng.setstate(snap.rng_state)
            excess = self._credit() - self._max_diff
            if self.cfg.samples_per_insert > 0 and self._size > self.cfg.min_size_to_sample and excess > 0:
                self._forgiven += excess
            if self._can_sample() is None:
                self._cond.notify_all()
        return dropped

    def set_step(self, step: int) -> None:
        """The trainer's current step, for the age-in-steps statistics."""
        with self._cond:
            self._step = int(step)

    def close(self) -> None:
        """Wake every waiting ``sample`` (they return None); later samples return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return self._size

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict[str, float]:
        """A consistent snapshot of every buffer metric (keys ``buffer/*``)."""
        now = time.monotonic()
        with self._cond:
            size = self._size
            out: dict[str, float] = {
                "buffer/size": size,
                "buffer/capacity": self.cfg.capacity,
                "buffer/fill": size / self.cfg.capacity,
                "buffer/inserts": self._inserts,
                "buffer/samples": self._samples,
                "buffer/reused": self._reused,
                "buffer/evicted": self._evicted,
                "buffer/evicted_never_sampled": self._evicted_never_sampled,
                "buffer/retired": self._retired,
                "buffer/starved": self._starved,
                "buffer/starved_min_size": self._starved_min_size,
                "buffer/starved_rate_limited": self._starved_rate,
                "buffer/starved_exclude": self._starved_exclude,
                "buffer/excluded_draws": self._excluded_draws,
                "buffer/credit_forgiven": self._forgiven,
                "buffer/samples_per_insert": self._samples / self._inserts if self._inserts else 0.0,
                "buffer/live_uses_mean": self._live_uses_sum() / size if size else 0.0,
            }
            held = {id(seq): seq for seq in self._seqs[self._head:self._tail] if seq is not None}
            out["buffer/bytes"] = sum(getattr(seq, "nbytes", 0) for seq in held.values())
            for b, count in enumerate(self._reuse_hist.tolist()):
                out[f"buffer/reuse_hist/{b}" if b < _REUSE_BINS else f"buffer/reuse_hist/ge{_REUSE_BINS}"] = count
            out["buffer/inserts_per_s"], out["buffer/samples_per_s"] = self._rates(now)
            ages_s = sorted(self._ages_s)
            ages_steps = sorted(self._ages_steps)
        out.update(_summary("buffer/sample_age_s", ages_s))
        out.update(_summary("buffer/sample_age_steps", ages_steps))
        return out

    def _live_uses_sum(self) -> int:
        head, tail = self._head, self._tail
        return int(self._uses[head:tail][self._live[head:tail]].sum())

    def _rates(self, now: float) -> tuple[float, float]:
        t0, i0, s0 = self._rate_marks[0]
        dt = max(now - t0, 1e-3)
        return (self._inserts - i0) / dt, (self._samples - s0) / dt


def _summary(prefix: str, values: list[Any]) -> dict[str, float]:
    """mean/p50/p90/max of a sorted list (zeros when empty)."""
    if not values:
        return {f"{prefix}_mean": 0.0, f"{prefix}_p50": 0.0, f"{prefix}_p90": 0.0, f"{prefix}_max": 0.0}
    n = len(values)
    return {
        f"{prefix}_mean": float(sum(values)) / n,
        f"{prefix}_p50": float(values[n // 2]),
        f"{prefix}_p90": float(values[min(n - 1, (9 * n) // 10)]),
        f"{prefix}_max": float(values[-1]),
    }
