"""The trainer's loader: real + buffer mix, starvation fallback, exact resume, corrupt records."""

import numpy as np
import pytest
import torch
from PIL import Image

from edsam_online.buffer import BufferConfig, ReplayBuffer
from edsam_online.data import RealDataConfig
from edsam_online.loader import MixConfig, MixedLoader
from edsam_online.models import ClipModelConfig, create_clip
from edsam_online.diffusion import GeneratedBatch
from edsam_online.runtime import RuntimeConfig
from edsam_online.wire import SyntheticSample, WireLimits, decode_message, encode_message

RES = 32


@pytest.fixture(scope="module")
def clip_io():
    _, preprocess_train, _, tokenizer = create_clip(ClipModelConfig(name="edsam-tiny"))
    return preprocess_train, tokenizer


def _synthetic(i: int) -> SyntheticSample:
    """A sample as a trainer receives it: encoded by a producer, validated by a receiver."""
    image = np.full((RES, RES, 3), i % 255, dtype=np.uint8)
    batch = GeneratedBatch.single(image, f"src{i}", f"a synthetic shape {i}", alpha=i / 100, seed=i, model_id="test")
    return decode_message(encode_message(batch, "test", 0, i), WireLimits())[1][0]


def _loader(clip_io, real_batch=4, extra_batch=0, buffer=None, data=None, extra_wait_s=MixConfig.extra_wait_s):
    transform, tokenizer = clip_io
    data = data or RealDataConfig(kind="builtin", resolution=RES, length=64, seed=3)
    return MixedLoader(data, transform, tokenizer, real_batch, extra_batch, buffer, mix=MixConfig(extra_wait_s=extra_wait_s),
                       runtime=RuntimeConfig(num_workers=1, prefetch=1))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_mixed_batches_keep_real_and_synthetic_parts_apart(clip_io):
    buffer = ReplayBuffer(BufferConfig(capacity=64, min_size_to_sample=1, samples_per_insert=0))
    for i in range(32):
        buffer.insert(_synthetic(i))
    (batch,) = _take(_loader(clip_io, real_batch=4, extra_batch=3, buffer=buffer), 1)
    assert batch.real_images.shape == (4, 3, RES, RES) and batch.real_texts.shape[0] == 4
    assert batch.extra_images.shape == (3, 3, RES, RES) and batch.extra_texts.shape[0] == 3
    assert batch.extra_genuine.all() and batch.num_genuine == 3
    assert all(k.startswith("src") for k in batch.extra_keys)
    # alpha travels with its sample from the header
    for key, alpha in zip(batch.extra_keys, batch.extra_alpha.tolist()):
        assert alpha == pytest.approx(int(key[3:]) / 100)
    assert not set(batch.real_keys) & set(batch.extra_keys)


def test_starved_slot_falls_back_to_real_data_without_touching_the_real_stream(clip_io):
    reference = [b.real_keys for b in _take(_loader(clip_io, real_batch=4), 4)]
    buffer = ReplayBuffer(BufferConfig(capacity=8, min_size_to_sample=4, samples_per_insert=0))  # never reaches min size
    batches = _take(_loader(clip_io, real_batch=4, extra_batch=4, buffer=buffer, extra_wait_s=0.01), 4)
    assert [b.real_keys for b in batches] == reference
    for b in batches:
        assert b.extra_images.shape[0] == 4 and b.num_genuine == 0
        assert not b.extra_genuine.any() and torch.isnan(b.extra_alpha).all()
    assert buffer.stats()["buffer/starved"] >= 16


class _TimedBuffer(ReplayBuffer):
    """Records the wait each draw is allowed."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.timeouts = []

    def sample_with_step(self, timeout_s=None, exclude=None):
        self.timeouts.append(timeout_s)
        return super().sample_with_step(timeout_s, exclude)


def test_slot_wait_is_bounded_per_batch_not_per_item(clip_io):
    buffer = _TimedBuffer(BufferConfig(capacity=8, min_size_to_sample=8, samples_per_insert=0))  # stays dry
    loader = _loader(clip_io, real_batch=2, extra_batch=16, buffer=buffer, extra_wait_s=0.2)
    it = iter(loader)
    for _ in range(4):
        assert next(it).num_genuine == 0
    # A slot's draws share one deadline: the first may wait up to extra_wait_s, and since it waits
    # out its whole allowance on a dry buffer, the other 15 are allowed nothing (per-item waits
    # would allow each 0.2 s).
    slots = [buffer.timeouts[i:i + 16] for i in range(0, 64, 16)]
    assert len(buffer.timeouts) >= 64
    assert all(slot[0] <= 0.2 and slot[1:] == [0.0] * 15 for slot in slots), slots


def test_resumed_loader_continues_the_real_stream_exactly(clip_io):
    full = [b.real_keys for b in _take(_loader(clip_io, real_batch=5), 8)]  # crosses an epoch (64/5)
    first = _loader(clip_io, real_batch=5)
    it = iter(first)
    head = [next(it).real_keys for _ in range(3)]
    state = first.state_dict()
    resumed = _loader(clip_io, real_batch=5)
    resumed.load_state_dict(state)
    tail = [b.real_keys for b in _take(resumed, 5)]
    assert head + tail == full


def test_resume_with_synthetic_slot_keeps_real_keys(clip_io):
    def buffer_with(n):
        buf = ReplayBuffer(BufferConfig(capacity=64, min_size_to_sample=1, samples_per_insert=0))
        for i in range(n):
            buf.insert(_synthetic(i))
        return buf

    full = [b.real_keys for b in _take(_loader(clip_io, 4, 2, buffer_with(10)), 6)]
    first = _loader(clip_io, 4, 2, buffer_with(10))
    it = iter(first)
    head = [next(it).real_keys for _ in range(2)]
    empty = ReplayBuffer(BufferConfig(capacity=4, min_size_to_sample=1, samples_per_insert=0))
    resumed = _loader(clip_io, 4, 2, empty, extra_wait_s=0.0)  # the buffer is empty now
    resumed.load_state_dict(first.state_dict())
    assert head + [b.real_keys for b in _take(resumed, 4)] == full


def test_corrupt_records_are_counted_and_skipped_with_full_batches(clip_io, tmp_path):
    rows = ["path,caption"]
    for i in range(12):
        path = tmp_path / f"img{i}.png"
        if i in (2, 7):
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        else:
            Image.fromarray(np.full((40, 40, 3), 20 * i, dtype=np.uint8)).save(path)
        rows.append(f"{path.name},picture number {i}")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    loader = _loader(clip_io, real_batch=5, data=RealDataConfig(kind="csv", path=str(csv), resolution=RES, shuffle=False))
    batches = _take(loader, 2)
    keys = [k for b in batches for k in b.real_keys]
    assert all(b.real_images.shape == (5, 3, RES, RES) for b in batches)
    assert len(keys) == 10 and len(set(keys)) == 10
    assert loader.stats()["data/corrupt_images"] >= 2
