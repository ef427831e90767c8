"""Wire format: round trips and one rejection per defect kind (unit level, no sockets)."""

import dataclasses
import io
import time

import msgpack
import numpy as np
import pytest
from PIL import Image

from edsam_online.diffusion import GeneratedBatch
from edsam_online.wire import (
    DROP_REASONS,
    MAX_THUMB_PX,
    SCHEMA_VERSION,
    WireError,
    WireLimits,
    decode_message,
    encode_message,
    provenance,
    source_thumbnails,
)

LIMITS = WireLimits(max_message_bytes=1 << 20, max_header_bytes=4096, max_side=512, max_caption_chars=200)


def one(img=None, **over):
    """A one-sample batch."""
    fields = dict(source_key="flat-0-001", caption="a small red star on a light background", alpha=-0.25, seed=1234,
                  model_id="tiny", rho=0.5, mode="transport", steps=10, inversion_steps=4, sample_index=2, guidance=3.0)
    fields.update(over)
    return GeneratedBatch.single(image() if img is None else img, **fields)


def many(k, per_source=2, **over):
    """K samples, ``per_source`` consecutive rows per source image, as the sampler lays them out."""
    u = -(-k // per_source)
    fields = dict(images=np.stack([image(seed=i) for i in range(k)]), source_keys=[f"src-{j}" for j in range(u)],
                  captions=[f"a small red star number {j}" for j in range(u)], source=np.arange(k) // per_source,
                  alpha=np.array([i / 10 - 0.2 for i in range(k)]), seed=100 + np.arange(k) // per_source,
                  sample_index=np.arange(k) % per_source, rho=0.5, model_id="tiny", mode="transport", steps=10,
                  inversion_steps=10, guidance=3.0)
    fields.update(over)
    return GeneratedBatch(**fields)


def encode(batch, encoding="raw", **kw):
    """As producer-0 of session 7 sends its message starting at sample 3."""
    return encode_message(batch, "producer-0", 7, 3, encoding=encoding, **kw)


def image(h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_bytes(frames):
    return [bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in frames]


def header_of(frames):
    return msgpack.unpackb(as_bytes(frames)[0])


def with_header(frames, **changes):
    header = header_of(frames)
    for key, value in changes.items():
        if value is KeyError:
            header.pop(key)
        else:
            header[key] = value
    return [msgpack.packb(header), as_bytes(frames)[1]]


def u8(values):
    return np.asarray(values, "<u8").tobytes()


def f8(values):
    return np.asarray(values, "<f8").tobytes()


def i8(values):
    return np.asarray(values, "<i8").tobytes()


def reason(frames, limits=LIMITS):
    with pytest.raises(WireError) as err:
        decode_message(frames, limits)
    assert err.value.reason in DROP_REASONS
    return err.value.reason


def test_raw_round_trip_is_exact_and_carries_provenance():
    img = image()
    before = time.time()
    frames = encode(one(img))
    after = time.time()
    header, (sample,) = decode_message(frames, LIMITS)
    np.testing.assert_array_equal(sample.image, img)
    assert (sample.caption, sample.source_key, sample.alpha) == ("a small red star on a light background",
                                                                 "flat-0-001", -0.25)
    assert type(sample.alpha) is float and sample.index == 0
    h = sample.header  # the full provenance, on demand
    assert h["v"] == SCHEMA_VERSION and h["shape"] == [24, 40, 3] and h["encoding"] == "raw"
    assert (h["producer_id"], h["session"], h["seq"], h["seed"], h["alpha"]) == ("producer-0", 7, 3, 1234, -0.25)
    assert (h["source_key"], h["caption"], h["sample_index"], h["mode"]) == (
        "flat-0-001", sample.caption, 2, "transport")
    assert (h["steps"], h["inversion_steps"], h["guidance"], h["rho"], h["model_id"]) == (10, 4, 3.0, 0.5, "tiny")
    assert h["nbytes"] == img.nbytes and before <= h["created_at"] <= after  # the wall clock when it was encoded
    assert all(type(h[name]) is int for name in ("seed", "nbytes", "sample_index")) and type(h["alpha"]) is float
    assert "source" not in h and "stats" not in h
    assert header["nbytes"].tolist() == [img.nbytes] and header["source_key"] == ["flat-0-001"]
    assert not sample.image.flags.writeable  # shares the frame's memory


def test_forwarded_stats_travel_in_the_message_header_only():
    header, (sample,) = decode_message(encode(one(), stats={"producer/samples_per_s": 2.5}), LIMITS)
    assert header["stats"] == {"producer/samples_per_s": 2.5} and "stats" not in sample.header


def test_a_steered_producers_feedback_endpoint_travels_with_every_sample():
    header, (sample,) = decode_message(encode(one(), feedback="tcp://node3:41234"), LIMITS)
    assert header["feedback"] == sample.header["feedback"] == "tcp://node3:41234"
    assert "feedback" not in decode_message(encode(one()), LIMITS)[0]


def test_many_samples_in_one_message_each_keep_their_own_fields():
    batch = many(5)
    header, samples = decode_message(encode(batch), LIMITS)
    assert len(samples) == 5 and header["seq"] == 3 and header["nbytes"].tolist() == [batch.images[0].nbytes] * 5
    assert header["source_key"] == ["src-0", "src-1", "src-2"]  # each source once
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s.image, batch.images[i])
        assert (s.caption, s.source_key, s.alpha) == (f"a small red star number {i // 2}", f"src-{i // 2}", i / 10 - 0.2)
        h = s.header
        assert (h["seq"], h["alpha"], h["seed"], h["sample_index"], h["source_key"], h["caption"]) == (
            3 + i, s.alpha, 100 + i // 2, i % 2, s.source_key, s.caption)
        assert (h["producer_id"], h["session"], h["rho"], h["model_id"]) == ("producer-0", 7, 0.5, "tiny")
        assert "stats" not in h
    assert samples[-1].header["seq"] == 7 and samples[-5].header["seq"] == 3
    with pytest.raises(IndexError):
        samples[5]
    with pytest.raises(IndexError):
        samples[-6]


def test_a_slice_of_rows_sends_only_the_sources_it_uses():
    batch = many(7, per_source=3)  # sources 0 0 0 1 1 1 2
    frames = encode(batch.rows(2, 5))
    header = header_of(frames)
    assert header["source_key"] == ["src-0", "src-1"] and header["caption"] == batch.captions[:2]
    assert np.frombuffer(header["source"], "<u4").tolist() == [0, 1, 1]
    _, samples = decode_message(frames, LIMITS)
    assert [(s.source_key, s.caption, s.alpha, s.header["seed"], s.header["sample_index"]) for s in samples] == [
        (f"src-{i // 3}", f"a small red star number {i // 3}", batch.alpha[i], 100 + i // 3, i % 3) for i in range(2, 5)]
    assert header_of(encode(batch.rows(3, 6)))["source_key"] == ["src-1"]


def test_columns_accept_lists_and_any_int_or_float_dtype():
    k = 3
    batch = many(k, per_source=1, alpha=[-0.5, 0, 0.5], seed=np.arange(k, dtype=np.uint16),
                 sample_index=np.arange(k, dtype=np.int32), source=np.arange(k, dtype=np.uint8))
    _, samples = decode_message(encode(batch), LIMITS)
    assert [s.alpha for s in samples] == [-0.5, 0.0, 0.5]
    assert [s.header["seed"] for s in samples] == [0, 1, 2] == [s.header["sample_index"] for s in samples]


@pytest.mark.parametrize("encoding", ["jpeg", "webp"])
def test_compressed_round_trip_is_close(encoding):
    imgs = np.full((3, 32, 32, 3), 120, np.uint8)
    for i in range(3):
        imgs[i, 8:24, 8 + i:20 + i] = (200, 30 * i, 30)
    frames = encode(many(3, images=imgs), encoding, quality=95)
    assert len(as_bytes(frames)[1]) < imgs.nbytes
    _, samples = decode_message(frames, LIMITS)
    assert len(samples) == 3
    for img, s in zip(imgs, samples):
        assert s.image.shape == img.shape and s.image.dtype == np.uint8
        assert np.abs(s.image.astype(int) - img).mean() < 4


def test_large_raw_payload_is_zero_copy():
    imgs = np.stack([image(256, 256, seed=i) for i in range(3)])
    for batch in (many(3, images=imgs), many(3, images=imgs).rows(1, 3)):  # a slice of rows too
        payload = encode(batch)[1]
        assert payload.buffer.obj is not None  # a view over the images, not a copy
        assert np.shares_memory(np.frombuffer(payload.buffer, np.uint8), imgs)


def test_encode_rejects_bad_arguments_naming_them():
    cases = [
        (one(np.zeros((4, 4), np.uint8)), "image"),
        (one(np.zeros((4, 4, 3), np.float32)), "image"),
        (many(4, captions=["one caption"]), "captions"),  # two sources
        (many(2, per_source=1, source_keys=["a", "b", "c"], captions=["x", "y", "z"]), "source_keys"),  # > K sources
        (many(2, alpha=[0.1]), "alpha"),
        (many(2, sample_index=[0, 1, 2]), "sample_index"),
        (many(2, per_source=1, source=[0, 2]), "source"),  # past the table
        (one(alpha="0.5"), "alpha"),
        (one(seed=True), "seed"),
        (one(seed=1.5), "seed"),
        (one(caption=b"bytes"), "caption"),
        (one(source_key=3), "source_key"),
        (one(rho="0.5"), "rho"),
        (one(model_id=None), "model_id"),
        (one(steps=10.0), "steps"),
        (one(guidance=np.float64(3.0)), "guidance"),  # msgpack packs only Python scalars
    ]
    for batch, name in cases:
        with pytest.raises(ValueError, match=name):
            encode(batch)
    with pytest.raises(ValueError, match="encoding"):
        encode(one(), "png")
    with pytest.raises(ValueError, match="seq"):
        encode_message(one(), "producer-0", 7, "3")
    with pytest.raises(ValueError, match="producer_id"):
        encode_message(one(), 0, 7, 3)
    with pytest.raises(ValueError, match="max_side"):
        WireLimits(max_side=0)
    with pytest.raises(ValueError, match="max_samples_per_message"):
        WireLimits(max_samples_per_message=0)


def test_every_defect_kind_has_its_reason():
    good = encode(one())
    raw = as_bytes(good)
    jpeg = as_bytes(encode(one(), "jpeg"))
    cases = {
        "frame_count": [raw[0]],
        "not_msgpack": [b"\xc1\xc1 not msgpack", raw[1]],
        "not_a_map": [msgpack.packb([1, 2, 3]), raw[1]],
        "header_too_large": [b"\x00" * 5000, raw[1]],
        "version": with_header(good, v=99),
        "missing_field": with_header(good, seed=KeyError),
        "wrong_type": with_header(good, seq="3"),
        "bad_value": with_header(good, alpha=f8([float("nan")])),
        "bad_shape": with_header(good, shape=[-24, 40, 3]),
        "caption_too_long": with_header(good, caption=["x" * 201]),
        "size_mismatch": with_header(good, shape=[24, 41, 3]),
        "bad_count": with_header(good, alpha=f8([0.1, 0.2])),
        "oversized": [raw[0], b"\x00" * (1 << 20)],
        "bad_stats": with_header(good, stats={"producer/x": "fast"}),
    }
    truncated = jpeg[1][: len(jpeg[1]) // 2]
    h = msgpack.unpackb(jpeg[0])
    h["nbytes"] = u8([len(truncated)])
    cases["undecodable"] = [msgpack.packb(h), truncated]
    for expected, frames in cases.items():
        assert reason(frames) == expected, expected
    assert set(cases) == set(DROP_REASONS)


def test_more_hostile_values():
    good = encode(one())
    assert reason(with_header(good, seq=True)) == "wrong_type"  # bool is not an int
    assert reason(with_header(good, seq=-1)) == "bad_value"
    assert reason(with_header(good, source=np.asarray([1], "<u4").tobytes())) == "bad_value"  # past the table
    assert reason(with_header(good, nbytes=u8([10**12]))) == "size_mismatch"
    assert reason(with_header(good, nbytes=1440)) == "wrong_type"  # a column must be bin
    assert reason(with_header(good, nbytes=[2880])) == "wrong_type"  # schema 2's lists are not read as columns
    assert reason(with_header(good, alpha=0.5)) == "wrong_type"
    assert reason(with_header(good, alpha=["0.5"])) == "wrong_type"
    assert reason(with_header(good, seed="7")) == "wrong_type"
    assert reason(with_header(good, nbytes=b"")) == "bad_count"
    assert reason(with_header(good, nbytes=b"\x00" * 7)) == "bad_count"  # not whole values
    assert reason(with_header(good, sample_index=i8([0, 1]))) == "bad_count"
    assert reason(with_header(good, nbytes=u8([2880] * 257)), WireLimits(max_header_bytes=8192)) == "bad_count"
    assert reason(with_header(good, caption=[])) == "bad_count"  # empty source table
    assert reason(with_header(good, caption=["a", "b"])) == "bad_count"  # keys and captions disagree
    assert reason(with_header(good, source_key=["a", "b"], caption=["c", "d"])) == "bad_count"  # more sources than samples
    assert reason(with_header(good, caption="a caption")) == "wrong_type"
    assert reason(with_header(good, source=KeyError)) == "missing_field"
    assert reason(with_header(good, shape=[10**9, 10**9, 3])) == "bad_shape"
    assert reason(with_header(good, shape=[24, 40, 4])) == "bad_shape"
    assert reason(with_header(good, shape="24x40")) == "wrong_type"
    assert reason(with_header(good, shape=KeyError)) == "missing_field"
    assert reason(with_header(good, v=KeyError)) == "version"
    assert reason(with_header(good, dtype="float32")) == "bad_value"
    assert reason(with_header(good, encoding="pickle")) == "bad_value"
    assert reason(with_header(good, caption=["   "])) == "bad_value"
    assert reason(with_header(good, stats={"train/loss": 1.0})) == "bad_stats"
    assert reason(with_header(good, feedback="http://evil.example/")) == "bad_value"
    assert reason(with_header(good, feedback="tcp://" + "h" * 300)) == "bad_value"
    assert reason(with_header(good, feedback=5)) == "wrong_type"
    assert reason([b"\x92" * 3000, as_bytes(good)[1]]) == "not_msgpack"  # deeply nested / truncated


def test_compressed_payload_declaring_a_different_size_is_refused_before_decoding():
    # A small file that would decode to a big image (decompression bomb) never gets decoded.
    big = io.BytesIO()
    Image.new("RGB", (500, 500)).save(big, format="JPEG")
    frames = encode(one(), "jpeg")
    h = header_of(frames)
    h["nbytes"] = u8([len(big.getvalue())])
    assert reason([msgpack.packb(h), big.getvalue()]) == "undecodable"
    png = io.BytesIO()
    Image.new("RGB", (40, 24)).save(png, format="PNG")  # not the declared format
    h["nbytes"] = u8([len(png.getvalue())])
    assert reason([msgpack.packb(h), png.getvalue()]) == "undecodable"


def test_one_bad_sample_drops_the_whole_message():
    good = encode(many(4, per_source=1))  # 4 sources: one bad table entry among good ones
    assert reason(with_header(good, alpha=f8([0.1, 0.2, float("inf"), 0.3]))) == "bad_value"
    assert reason(with_header(good, caption=["a", "b", "", "d"])) == "bad_value"
    assert reason(with_header(good, caption=["a", "b", "x" * 201, "d"])) == "caption_too_long"
    assert reason(with_header(good, source_key=["a", "b", 3, "d"])) == "wrong_type"
    assert reason(with_header(good, source_key=["a", "b", "k" * 300, "d"])) == "bad_value"
    nb = np.frombuffer(header_of(good)["nbytes"], "<u8").astype(int)
    assert reason(with_header(good, nbytes=u8(nb + [1, -1, 0, 0]))) == "size_mismatch"
    jpeg = encode(many(4, per_source=1), "jpeg")
    h, payload = header_of(jpeg), as_bytes(jpeg)[1]
    nb = np.frombuffer(h["nbytes"], "<u8").astype(int)
    h["nbytes"] = u8(nb + [7, -7, 0, 0])  # splits inside files
    assert reason([msgpack.packb(h), payload]) == "undecodable"
    # Sizes whose unsigned 64-bit sum wraps around to the payload length are refused, not sliced.
    h["nbytes"] = u8([2**64 - 1, len(payload) + 1, 0, 0])
    assert reason([msgpack.packb(h), payload]) == "size_mismatch"


def test_fidelity_score_column_round_trips_and_is_optional():
    scored = many(4).scored(np.array([0.0, 0.25, 1.0, 0.5]))
    header, batch = decode_message(encode(scored), LIMITS)
    assert [s.score for s in batch] == [0.0, 0.25, 1.0, 0.5]
    assert batch[1].header["score"] == 0.25
    _, unscored = decode_message(encode(many(2)), LIMITS)
    assert [s.score for s in unscored] == [None, None]  # a producer without a scorer sends no column


def test_hostile_score_columns_are_dropped():
    good = encode(many(2).scored(np.array([0.5, 0.75])))
    f4 = lambda values: np.asarray(values, "<f4").tobytes()  # noqa: E731
    assert reason(with_header(good, score=f4([0.5, float("nan")]))) == "bad_value"
    assert reason(with_header(good, score=f4([0.5, float("inf")]))) == "bad_value"
    assert reason(with_header(good, score=f4([0.5, 1.5]))) == "bad_value"
    assert reason(with_header(good, score=f4([-0.1, 0.5]))) == "bad_value"
    assert reason(with_header(good, score=f4([0.5]))) == "bad_count"  # one score for two samples
    assert reason(with_header(good, score=f4([0.5, 0.5, 0.5]))) == "bad_count"
    assert reason(with_header(good, score=[0.5, 0.5])) == "wrong_type"  # a column is bin
    with pytest.raises(ValueError, match="score"):
        encode(dataclasses.replace(many(2), score=np.array([0.5, 2.0])))  # a sender checks it too


def test_selected_rows_keep_their_sources_scores_and_columns():
    batch = many(6, per_source=2).scored(np.linspace(0, 1, 6))
    kept = batch.select(np.array([False, False, True, False, False, True]))
    assert kept.source_keys == ["src-1", "src-2"] and kept.source.tolist() == [0, 1]
    assert kept.alpha.tolist() == [batch.alpha[2], batch.alpha[5]] and kept.score.tolist() == [batch.score[2], batch.score[5]]
    _, received = decode_message(encode(kept), LIMITS)
    assert [(s.source_key, s.score) for s in received] == [("src-1", kept.score[0]), ("src-2", kept.score[1])]
    with pytest.raises(ValueError, match="keep"):
        batch.select(np.zeros(6, bool))
    with pytest.raises(ValueError, match="score"):
        batch.scored(np.array([0.5] * 5))


@pytest.mark.parametrize("scored", [False, True])
def test_a_shards_provenance_is_what_a_receiver_reads_for_the_same_sample(scored):
    """The shard sink's JSON (provenance) and the stream's per-sample header carry one provenance."""
    batch = many(5)
    if scored:
        batch = batch.scored(np.linspace(0, 1, 5, dtype=np.float32))
    _, received = decode_message(encode_message(batch, "producer-0", 7, 3), LIMITS)
    for i in range(len(batch)):
        header, expected = received.sample_header(i), provenance(batch, i, "producer-0", 7, 3 + i)
        assert expected == {k: header[k] for k in expected}
        assert set(header) - set(expected) == {"v", "created_at", "shape", "dtype", "encoding", "nbytes"}  # transport
    assert ("score" in provenance(batch, 0, "p", 0, 0)) == scored


def thumbs(u, side=4):
    return np.stack([np.full((side, side, 3), 10 * j, np.uint8) for j in range(u)])


def test_source_thumbnails_travel_once_per_source_and_are_optional():
    batch = many(5, source_thumbs=thumbs(3))  # sources 0 0 1 1 2
    frames = encode(batch)
    assert len(header_of(frames)["source_thumb"]) == 3 * 4 * 4 * 3 and header_of(frames)["source_thumb_px"] == 4
    header, samples = decode_message(frames, LIMITS)
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s.source_thumb, batch.source_thumbs[i // 2])
        assert not s.source_thumb.flags.writeable and "source_thumb" not in s.header
    assert np.shares_memory(samples[0].source_thumb, samples[1].source_thumb)  # one thumbnail, two samples
    assert samples.nbytes == batch.images.nbytes + batch.source_thumbs.nbytes
    _, sliced = decode_message(encode(batch.rows(2, 5)), LIMITS)  # sources 1 and 2 only
    assert [int(s.source_thumb[0, 0, 0]) for s in sliced] == [10, 10, 20]
    kept = batch.select(np.array([True, False, False, False, True]))
    assert [int(s.source_thumb[0, 0, 0]) for s in decode_message(encode(kept), LIMITS)[1]] == [0, 20]
    _, plain = decode_message(encode(many(2)), LIMITS)  # an older producer, or source_thumb_px=0
    assert [s.source_thumb for s in plain] == [None, None] and "source_thumb" not in header_of(encode(many(2)))
    np.testing.assert_array_equal(source_thumbnails(np.full((2, 24, 40, 3), 7, np.uint8), 8),
                                  np.full((2, 8, 8, 3), 7, np.uint8))
    assert source_thumbnails(np.zeros((2, 8, 8, 3), np.uint8), 0) is None  # producer.source_thumb_px=0


def test_malformed_source_thumbnails_are_dropped_with_their_reason():
    good = encode(many(4, source_thumbs=thumbs(2)))  # 2 sources of 4x4
    assert reason(with_header(good, source_thumb=b"\x00" * 95)) == "size_mismatch"
    assert reason(with_header(good, source_thumb=b"\x00" * 48)) == "size_mismatch"  # one source's worth
    assert reason(with_header(good, source_thumb_px=5)) == "size_mismatch"
    assert reason(with_header(good, source_thumb_px=0, source_thumb=b"")) == "bad_shape"
    assert reason(with_header(good, source_thumb_px=MAX_THUMB_PX + 1)) == "bad_shape"
    assert reason(with_header(good, source_thumb_px=4.0)) == "wrong_type"
    assert reason(with_header(good, source_thumb_px=True)) == "wrong_type"
    assert reason(with_header(good, source_thumb=[0] * 96)) == "wrong_type"
    assert reason(with_header(good, source_thumb=KeyError)) == "missing_field"
    assert reason(with_header(good, source_thumb_px=KeyError)) == "missing_field"
    for bad in (thumbs(2).astype(np.float32), thumbs(3), thumbs(2)[:, :, :3], thumbs(2, side=MAX_THUMB_PX + 1),
                list(thumbs(2))):
        with pytest.raises(ValueError, match="source_thumbs"):
            encode(many(4, source_thumbs=bad))
