"""Bounded replay buffer for synthetic samples, with Reverb's table semantics.

A Reverb table (DeepMind) is a sampler + a remover + a rate limiter. Here:
uniform sampling with replacement, FIFO eviction at ``capacity``, retirement
after ``max_times_sampled`` uses, and Reverb's ``SampleToInsertRatio``
limiter (``min_size_to_sample``, ``samples_per_insert``, ``error_buffer``).
Reverb itself is a TensorFlow gRPC server with no wheels for this stack, and
no pure-Python library offers these semantics behind a thread-safe in-process
API, so this is written by hand (~200 lines).

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
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Generic, Iterable, TypeVar

T = TypeVar("T")

_REUSE_BINS = 8  # buffer/reuse_hist/0 .. /7, then /ge8
_AGE_WINDOW = 1024  # sampled-item ages kept for the age statistics
_RATE_WINDOW_S = 10.0


@dataclass
class BufferConfig:
    """Replay buffer settings.

    ``samples_per_insert = 0`` disables the ratio limiter (only ``min_size_to_sample``
    gates sampling). ``error_buffer`` is Reverb's: sampling blocks when
    ``inserts * samples_per_insert - samples`` would fall below
    ``samples_per_insert * min_size_to_sample - error_buffer``; ``None`` means
    ``max(1, samples_per_insert)``, the smallest margin that cannot deadlock.
    ``max_times_sampled = 0`` means unlimited reuse. ``sample_timeout_s`` is the
    bounded wait of :meth:`ReplayBuffer.sample` when called without a timeout.
    """

    capacity: int = 4096
    min_size_to_sample: int = 1
    max_times_sampled: int = 0
    samples_per_insert: float = 0.0
    error_buffer: float | None = None
    sample_timeout_s: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not 1 <= self.min_size_to_sample <= self.capacity:
            raise ValueError(f"min_size_to_sample must be in [1, capacity={self.capacity}], got {self.min_size_to_sample}")
        if self.max_times_sampled < 0:
            raise ValueError(f"max_times_sampled must be >= 0, got {self.max_times_sampled}")
        if self.samples_per_insert < 0:
            raise ValueError(f"samples_per_insert must be >= 0, got {self.samples_per_insert}")
        if self.error_buffer is None:
            self.error_buffer = max(1.0, float(self.samples_per_insert))
        if self.samples_per_insert > 0 and self.error_buffer < max(1.0, self.samples_per_insert):
            raise ValueError(
                f"error_buffer must be >= max(1, samples_per_insert)={max(1.0, self.samples_per_insert)} "
                f"(smaller margins can block sampling for good), got {self.error_buffer}"
            )
        if self.sample_timeout_s < 0:
            raise ValueError(f"sample_timeout_s must be >= 0, got {self.sample_timeout_s}")


class _Item(Generic[T]):
    __slots__ = ("value", "uses", "inserted_at", "inserted_step", "pos")

    def __init__(self, value: T, now: float, step: int) -> None:
        self.value = value
        self.uses = 0
        self.inserted_at = now
        self.inserted_step = step
        self.pos = -1  # index in ReplayBuffer._slots


class ReplayBuffer(Generic[T]):
    """Thread-safe bounded table: ``insert`` from the receiver thread, ``sample`` from loaders.

    ``sample(timeout_s)`` returns ``None`` when it cannot serve within the bounded wait
    (too few items, or the rate limiter says reuse is exhausted) and counts it in
    ``buffer/starved``; the loader then fills the slot from real data.
    """

    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self._cond = threading.Condition(threading.Lock())
        self._rng = random.Random(cfg.seed)
        self._fifo: collections.deque[_Item[T]] = collections.deque()
        self._slots: list[_Item[T]] = []  # live items; O(1) uniform pick and swap-remove
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
        self._reuse_hist = [0] * (_REUSE_BINS + 1)
        self._ages_s: collections.deque[float] = collections.deque(maxlen=_AGE_WINDOW)
        self._ages_steps: collections.deque[int] = collections.deque(maxlen=_AGE_WINDOW)
        self._rate_marks: collections.deque[tuple[float, int, int]] = collections.deque([(time.monotonic(), 0, 0)])

    # ------------------------------------------------------------------ limiter

    def _credit(self) -> float:
        return self._inserts * self.cfg.samples_per_insert - self._samples - self._forgiven

    def _can_sample(self) -> str | None:
        """None if a sample may be served now, else why not ("min_size" or "rate")."""
        if len(self._slots) < self.cfg.min_size_to_sample:
            return "min_size"
        if self.cfg.samples_per_insert > 0 and self._credit() - 1 < self._min_diff:
            return "rate"
        return None

    # ------------------------------------------------------------------ table ops

    def insert(self, value: T) -> None:
        """Add one item, evicting the oldest when full. Never blocks."""
        self.insert_many((value,))

    def insert_many(self, values: Iterable[T]) -> None:
        """Add items in order under one lock (a received message's samples). Never blocks."""
        now = time.monotonic()
        with self._cond:
            for value in values:
                if len(self._slots) >= self.cfg.capacity:
                    oldest = self._fifo[0]
                    self._remove(oldest)
                    self._evicted += 1
                    if oldest.uses == 0:
                        self._evicted_never_sampled += 1
                item = _Item(value, now, self._step)
                item.pos = len(self._slots)
                self._slots.append(item)
                self._fifo.append(item)
                self._inserts += 1
                if self.cfg.samples_per_insert > 0:
                    excess = self._credit() - self._max_diff
                    # Only once min_size is reached: before that Reverb lets inserts run free.
                    if excess > 0 and len(self._slots) > self.cfg.min_size_to_sample:
                        self._forgiven += excess
            self._mark_rate(now)
            if self._can_sample() is None:
                self._cond.notify_all()

    def sample(self, timeout_s: float | None = None) -> T | None:
        """One item drawn uniformly, or ``None`` after waiting at most ``timeout_s``
        (``cfg.sample_timeout_s`` when None; 0 = do not wait)."""
        timeout = self.cfg.sample_timeout_s if timeout_s is None else timeout_s
        if timeout < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout}")
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
            item = self._slots[self._rng.randrange(len(self._slots))]
            item.uses += 1
            self._samples += 1
            now = time.monotonic()
            self._ages_s.append(now - item.inserted_at)
            self._ages_steps.append(self._step - item.inserted_step)
            if self.cfg.max_times_sampled and item.uses >= self.cfg.max_times_sampled:
                self._remove(item)
                self._retired += 1
            self._mark_rate(now)
            return item.value

    def _remove(self, item: _Item[T]) -> None:
        last = self._slots.pop()
        if last is not item:
            last.pos = item.pos
            self._slots[item.pos] = last
        item.pos = -1
        # FIFO order: drop retired items lazily from the left, the evicted one directly.
        if self._fifo and self._fifo[0] is item:
            self._fifo.popleft()
        while self._fifo and self._fifo[0].pos < 0:
            self._fifo.popleft()
        if len(self._fifo) > 2 * self.cfg.capacity:  # many retirements in the middle
            self._fifo = collections.deque(i for i in self._fifo if i.pos >= 0)
        self._reuse_hist[min(item.uses, _REUSE_BINS)] += 1

    def _mark_rate(self, now: float) -> None:
        marks = self._rate_marks
        if not marks or now - marks[-1][0] >= 0.25:
            marks.append((now, self._inserts, self._samples))
            while len(marks) > 2 and now - marks[1][0] > _RATE_WINDOW_S:
                marks.popleft()

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
            return len(self._slots)

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict[str, float]:
        """A consistent snapshot of every buffer metric (keys ``buffer/*``)."""
        now = time.monotonic()
        with self._cond:
            size = len(self._slots)
            out: dict[str, float] = {
                "buffer/size": size,
                "buffer/capacity": self.cfg.capacity,
                "buffer/fill": size / self.cfg.capacity,
                "buffer/inserts": self._inserts,
                "buffer/samples": self._samples,
                "buffer/evicted": self._evicted,
                "buffer/evicted_never_sampled": self._evicted_never_sampled,
                "buffer/retired": self._retired,
                "buffer/starved": self._starved,
                "buffer/starved_min_size": self._starved_min_size,
                "buffer/starved_rate_limited": self._starved_rate,
                "buffer/credit_forgiven": self._forgiven,
                "buffer/samples_per_insert": self._samples / self._inserts if self._inserts else 0.0,
                "buffer/live_uses_mean": sum(i.uses for i in self._slots) / size if size else 0.0,
            }
            for b, count in enumerate(self._reuse_hist):
                out[f"buffer/reuse_hist/{b}" if b < _REUSE_BINS else f"buffer/reuse_hist/ge{_REUSE_BINS}"] = count
            out["buffer/inserts_per_s"], out["buffer/samples_per_s"] = self._rates(now)
            ages_s = sorted(self._ages_s)
            ages_steps = sorted(self._ages_steps)
        out.update(_summary("buffer/sample_age_s", ages_s))
        out.update(_summary("buffer/sample_age_steps", ages_steps))
        return out

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
