"""Replay buffer: Reverb table semantics, asserted on its counters (not on timing)."""

import dataclasses
import random
import threading
import time

import pytest

from edsam_online.buffer import BufferConfig, ReplayBuffer


def drain(buf, limit=100_000):
    """Sample without waiting until the buffer refuses; returns the items served."""
    out = []
    while len(out) < limit:
        item = buf.sample(0)
        if item is None:
            return out
        out.append(item)
    raise AssertionError("buffer never refused")


def test_fifo_eviction_at_capacity_counts_never_sampled():
    buf = ReplayBuffer(BufferConfig(capacity=5, min_size_to_sample=1, samples_per_insert=0))
    for i in range(5):
        buf.insert(i)
    assert buf.sample(0) is not None
    for i in range(5, 12):
        buf.insert(i)
    s = buf.stats()
    assert s["buffer/size"] == 5 and s["buffer/fill"] == 1.0
    assert s["buffer/evicted"] == 7
    assert s["buffer/evicted_never_sampled"] in (6, 7)  # the sampled one may or may not be among the evicted
    assert set(drain(ReplayBuffer(BufferConfig(capacity=5, min_size_to_sample=1, samples_per_insert=0)))) == set()
    # What remains are exactly the 5 newest items.
    seen = {buf.sample(0) for _ in range(300)}
    assert seen == {7, 8, 9, 10, 11}


def test_min_size_to_sample_gates_sampling():
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=10, samples_per_insert=0))
    for i in range(9):
        buf.insert(i)
        assert buf.sample(0) is None
    s = buf.stats()
    assert s["buffer/starved"] == 9 and s["buffer/starved_min_size"] == 9 and s["buffer/samples"] == 0
    buf.insert(9)
    assert buf.sample(0) is not None


def test_max_times_sampled_retires_items_after_k_uses():
    k, n = 3, 40
    buf = ReplayBuffer(BufferConfig(capacity=100, max_times_sampled=k, seed=1, min_size_to_sample=1, samples_per_insert=0))
    for i in range(n):
        buf.insert(i)
    served = drain(buf)
    assert len(served) == n * k
    assert all(served.count(i) == k for i in range(n))
    s = buf.stats()
    assert s["buffer/retired"] == n and s["buffer/size"] == 0
    assert s[f"buffer/reuse_hist/{k}"] == n
    assert sum(v for key, v in s.items() if key.startswith("buffer/reuse_hist/")) == n


@pytest.mark.parametrize("spi,min_size,error_buffer", [(2.0, 4, 2.0), (0.5, 10, 1.0), (4.0, 1, 8.0)])
def test_samples_per_insert_limiter_matches_reverb_bounds(spi, min_size, error_buffer):
    cfg = BufferConfig(capacity=10_000, min_size_to_sample=min_size, samples_per_insert=spi, error_buffer=error_buffer)
    buf = ReplayBuffer(cfg)
    min_diff = spi * min_size - error_buffer
    rng = random.Random(0)
    refused_with_room = 0
    for _ in range(3000):
        if rng.random() < 0.5:
            buf.insert(object())
        else:
            got = buf.sample(0)
            s = buf.stats()
            if got is None and s["buffer/size"] >= min_size:
                refused_with_room += 1
                # Refused only when one more sample would cross Reverb's lower bound.
                assert s["buffer/inserts"] * spi - s["buffer/samples"] - s["buffer/credit_forgiven"] - 1 < min_diff
        s = buf.stats()
        # The guarantee: samples never exceed spi * inserts - min_diff.
        assert s["buffer/samples"] <= max(0.0, s["buffer/inserts"] * spi - min_diff) + 1e-9
    assert refused_with_room > 0 or spi >= 1  # the limiter did engage when sampling outpaced it
    s = buf.stats()
    # Measured ratio over the run stays within the configured bound.
    assert s["buffer/samples"] / s["buffer/inserts"] <= spi + (error_buffer - spi * min_size) / s["buffer/inserts"] + 1e-9


def test_limiter_exact_counts_after_min_size():
    buf = ReplayBuffer(BufferConfig(capacity=100, min_size_to_sample=4, samples_per_insert=2.0, error_buffer=2.0))
    for i in range(4):
        buf.insert(i)
    assert len(drain(buf)) == 2  # error_buffer worth of samples once min size is reached
    for i in range(4, 9):
        buf.insert(i)
        assert len(drain(buf)) == 2  # then exactly samples_per_insert per insert
    assert buf.stats()["buffer/starved_rate_limited"] == 6


def test_lagging_trainer_cannot_bank_unbounded_reuse():
    buf = ReplayBuffer(BufferConfig(capacity=1000, min_size_to_sample=1, samples_per_insert=1.0, error_buffer=5.0))
    for i in range(500):  # producers far ahead of the trainer
        buf.insert(i)
    s = buf.stats()
    assert s["buffer/credit_forgiven"] > 0
    # Credit is capped at max_diff, so only max_diff - min_diff = 2 * error_buffer samples are banked.
    assert len(drain(buf)) == 10


def test_bounded_wait_returns_none_and_an_insert_wakes_a_waiter():
    buf = ReplayBuffer(BufferConfig(capacity=10, sample_timeout_s=0.05, min_size_to_sample=1, samples_per_insert=0))
    got, t0 = [], time.monotonic()
    starved = threading.Thread(target=lambda: got.append((buf.sample(), time.monotonic() - t0)))
    starved.start()
    starved.join(120)  # bounded: it returns (a loaded machine may take long, never forever)
    assert not starved.is_alive() and got[0][0] is None and got[0][1] >= 0.05  # after waiting its timeout
    assert buf.stats()["buffer/starved"] == 1
    got = []
    waiter = threading.Thread(target=lambda: got.append(buf.sample(timeout_s=600)))
    waiter.start()
    deadline = time.monotonic() + 120
    while len(buf._cond._waiters) < 1 and time.monotonic() < deadline:  # waiting inside sample()
        time.sleep(0.01)
    buf.insert("x")
    waiter.join(120)  # the insert wakes it: its own timeout is far longer
    assert got == ["x"]
    assert buf.stats()["buffer/starved"] == 1


def test_close_wakes_waiters():
    buf = ReplayBuffer(BufferConfig(capacity=10, min_size_to_sample=1, samples_per_insert=0))
    got = []
    waiter = threading.Thread(target=lambda: got.append(buf.sample(timeout_s=30)))
    waiter.start()
    time.sleep(0.05)
    buf.close()
    waiter.join(5)
    assert got == [None] and not waiter.is_alive()


def test_concurrent_inserts_and_samples_keep_counters_consistent():
    buf = ReplayBuffer(BufferConfig(capacity=64, max_times_sampled=4, sample_timeout_s=0.0, min_size_to_sample=1, samples_per_insert=0))
    served = []
    lock = threading.Lock()

    def insert(base):
        for i in range(1000):
            buf.insert(base + i)

    def sample():
        mine = [x for x in (buf.sample() for _ in range(1500)) if x is not None]
        with lock:
            served.extend(mine)

    threads = [threading.Thread(target=insert, args=(b,)) for b in (0, 10_000)]
    threads += [threading.Thread(target=sample) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s = buf.stats()
    assert s["buffer/inserts"] == 2000
    assert s["buffer/samples"] == len(served)
    assert s["buffer/size"] <= 64
    assert s["buffer/evicted"] + s["buffer/retired"] + s["buffer/size"] == 2000
    assert max(served.count(x) for x in set(served)) <= 4


def test_stats_report_rates_and_ages_in_seconds_and_steps():
    buf = ReplayBuffer(BufferConfig(capacity=10, min_size_to_sample=1, samples_per_insert=0))
    buf.set_step(5)
    t0 = time.monotonic()
    buf.insert("a")
    buf.set_step(12)
    assert buf.sample(0) == "a"
    elapsed = time.monotonic() - t0
    s = buf.stats()
    assert s["buffer/sample_age_steps_mean"] == 7 and s["buffer/sample_age_steps_max"] == 7
    # the age in seconds is the time from the insert to the draw: within the span that holds both
    assert 0 <= s["buffer/sample_age_s_max"] == s["buffer/sample_age_s_mean"] <= elapsed
    assert s["buffer/inserts_per_s"] > 0 and s["buffer/samples_per_s"] > 0
    assert all(k.startswith("buffer/") for k in s)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(capacity=0), "capacity"),
        (dict(capacity=4, min_size_to_sample=5), "min_size_to_sample"),
        (dict(max_times_sampled=-1), "max_times_sampled"),
        (dict(samples_per_insert=-1), "samples_per_insert"),
        (dict(samples_per_insert=4, error_buffer=2), "error_buffer"),
        (dict(sample_timeout_s=-1), "sample_timeout_s"),
    ],
)
def test_config_errors_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BufferConfig(**kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_reference_table_under_random_inserts_samples_and_retirements(seed):
    """The slot-column storage (window, holes, compaction) against a plain ordered dict:
    the same items live, the same FIFO evictions, the same counters, after every operation."""
    cap, k_max = 7, 3
    buf = ReplayBuffer(BufferConfig(capacity=cap, max_times_sampled=k_max, seed=seed, min_size_to_sample=1, samples_per_insert=0))
    ref: dict[int, int] = {}  # item -> uses, in insertion order
    counts = {"evicted": 0, "evicted_never_sampled": 0, "retired": 0}
    reuse = [0] * 9
    rng = random.Random(seed)
    next_item = 0
    for _ in range(600):
        if rng.random() < 0.5:
            batch = tuple(range(next_item, next_item + rng.randint(1, 2 * cap + 2)))  # may exceed capacity
            next_item += len(batch)
            buf.insert_many(batch)
            for item in batch:
                if len(ref) == cap:
                    oldest = next(iter(ref))
                    uses = ref.pop(oldest)
                    counts["evicted"] += 1
                    counts["evicted_never_sampled"] += uses == 0
                    reuse[min(uses, 8)] += 1
                ref[item] = 0
        else:
            for _ in range(rng.randint(1, 5)):
                item = buf.sample(0)
                if item is None:
                    assert not ref
                    break
                assert item in ref
                ref[item] += 1
                if ref[item] == k_max:
                    reuse[min(ref.pop(item), 8)] += 1
                    counts["retired"] += 1
        s = buf.stats()
        assert s["buffer/size"] == len(ref) == len(buf)
        assert {name: s[f"buffer/{name}"] for name in counts} == counts
        assert [s[f"buffer/reuse_hist/{b}"] for b in range(8)] + [s["buffer/reuse_hist/ge8"]] == reuse
        assert s["buffer/live_uses_mean"] == pytest.approx(sum(ref.values()) / len(ref) if ref else 0.0)
    # What is left is served exactly k_max - uses more times each.
    left = drain(buf)
    assert sorted(left) == sorted(item for item, uses in ref.items() for _ in range(k_max - uses))


def test_insert_many_keeps_a_reference_and_serves_its_items():
    class Seq:
        """A sequence that builds its items on access, as a received message does."""

        def __init__(self, n):
            self.n, self.built = n, 0

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            self.built += 1
            return ("item", i)

    seq = Seq(5)
    buf = ReplayBuffer(BufferConfig(capacity=3, min_size_to_sample=1, samples_per_insert=0))
    buf.insert_many(seq)
    assert seq.built == 0  # nothing is built on insert
    s = buf.stats()
    assert s["buffer/inserts"] == 5 and s["buffer/size"] == 3 and s["buffer/evicted"] == 2
    assert {buf.sample(0) for _ in range(100)} == {("item", 2), ("item", 3), ("item", 4)}
    assert seq.built == 100


def test_bytes_count_every_message_a_live_sample_keeps_in_memory():
    import numpy as np

    from edsam_online.wire import SampleBatch

    def message(k):
        return SampleBatch({}, np.zeros((k, 8, 8, 3), np.uint8), 0.0)

    buf = ReplayBuffer(BufferConfig(capacity=10, min_size_to_sample=1, samples_per_insert=0))
    assert buf.stats()["buffer/bytes"] == 0
    for _ in range(2):
        buf.insert_many(message(4))
    assert buf.stats()["buffer/bytes"] == 8 * 192
    buf.insert_many(message(4))  # evicts 2 samples of the first message: its other 2 keep all 4 images alive
    assert buf.stats()["buffer/size"] == 10 and buf.stats()["buffer/bytes"] == 12 * 192
    buf.insert_many(message(2))  # the first message's last samples go, and its images with them
    assert buf.stats()["buffer/bytes"] == 10 * 192


def test_a_draw_tells_the_trainer_step_at_which_its_item_was_inserted():
    buf = ReplayBuffer(BufferConfig(capacity=8, min_size_to_sample=1, samples_per_insert=0))
    buf.set_step(3)
    buf.insert_many(["a", "b"])
    buf.set_step(10)
    buf.insert("c")
    draws = {buf.sample_with_step(0) for _ in range(100)}
    assert draws == {("a", 3), ("b", 3), ("c", 10)}
    assert buf.stats()["buffer/sample_age_steps_max"] == 7  # the age statistics count the same steps


def _table(buf):
    """What a snapshot must carry over, as comparable values: the items oldest first with their
    uses and insert steps, the counters (limiter's included), the reuse histogram, step and RNG."""
    snap = buf.snapshot()
    items = [seq[i] for seq, i in zip(snap.seqs, snap.index.tolist())]
    return (items, snap.uses.tolist(), snap.inserted_step.tolist(), snap.counters, snap.reuse_hist.tolist(),
            snap.step, snap.rng_state)


def _counters(buf):
    """stats() without what depends on the clock, the sampled-age windows or memory held."""
    return {k: v for k, v in buf.stats().items()
            if not ("_per_s" in k or "sample_age" in k or k == "buffer/bytes")}


@pytest.mark.parametrize("max_times_sampled", [0, 3])
def test_a_restored_table_equals_the_snapshotted_one_and_its_limiter_serves_alike(max_times_sampled):
    cfg = BufferConfig(capacity=16, min_size_to_sample=4, samples_per_insert=2.0, error_buffer=6.0,
                       max_times_sampled=max_times_sampled, seed=3)
    buf = ReplayBuffer(cfg)
    rng = random.Random(max_times_sampled)
    for step in range(60):  # evictions, rate- and size-starved draws, retirements
        buf.set_step(step)
        if rng.random() < 0.45:
            buf.insert_many([f"{step}-{j}" for j in range(rng.randint(1, 5))])
        else:
            for _ in range(rng.randint(1, 6)):
                buf.sample(0)
    s = buf.stats()
    assert s["buffer/evicted"] > 0 and s["buffer/starved_rate_limited"] > 0 and s["buffer/size"] >= 4
    assert (s["buffer/retired"] > 0) == (max_times_sampled > 0)

    twin = ReplayBuffer(cfg)
    assert twin.restore(buf.snapshot()) == 0
    assert _table(twin) == _table(buf)
    assert _counters(twin) == _counters(buf)
    if max_times_sampled == 0:  # no holes in the original's window: the same RNG draws the same items
        for i in range(5):
            for b in (buf, twin):
                b.insert_many([f"new{i}-{j}" for j in range(2)])
            assert drain(twin) == drain(buf)  # the limiter stops both after the same draws
        assert _counters(twin) == _counters(buf)


def test_restored_items_go_before_those_already_there_and_what_does_not_fit_is_evicted():
    cfg = BufferConfig(capacity=5, min_size_to_sample=1, samples_per_insert=0)
    old = ReplayBuffer(cfg)
    old.insert_many(["a", "b", "c", "d"])
    new = ReplayBuffer(cfg)
    new.insert_many(["x", "y"])  # received before the restore
    assert new.restore(old.snapshot()) == 1  # 4 + 2 > 5: the oldest restored item goes
    assert _table(new)[0] == ["b", "c", "d", "x", "y"]
    s = new.stats()
    assert (s["buffer/inserts"], s["buffer/evicted"], s["buffer/evicted_never_sampled"]) == (6, 1, 1)
    new.insert("z")  # FIFO continues from the restored order
    assert _table(new)[0] == ["c", "d", "x", "y", "z"]


def test_a_snapshot_that_is_not_a_tables_is_refused_and_the_table_left_alone():
    import numpy as np

    buf = ReplayBuffer(BufferConfig(capacity=5, min_size_to_sample=1, samples_per_insert=0))
    buf.insert_many(["a", "b"])
    good = buf.snapshot()
    for change, match in [({"uses": np.array([0, -1])}, "uses"), ({"age_s": np.array([0.0, np.nan])}, "age_s"),
                          ({"index": np.array([0], np.int64)}, "index"), ({"counters": {"inserts": 2}}, "counters"),
                          ({"counters": {**good.counters, "samples": 1.5}}, "samples"),
                          ({"rng_state": (3, (1, 2), None)}, "random")]:
        bad = dataclasses.replace(good, **change)
        table = ReplayBuffer(BufferConfig(capacity=5, min_size_to_sample=1, samples_per_insert=0))
        with pytest.raises(ValueError, match=match):
            table.restore(bad)
        assert len(table) == 0 and table.stats()["buffer/inserts"] == 0
