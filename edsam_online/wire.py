"""Wire format: a two-frame ZeroMQ message ``[header, payload]`` carrying K >= 1 samples.

``header`` is msgpack (never pickle: a network peer must not be able to run
code on a trainer), ``payload`` the K images back to back: raw uint8 HxWx3 each,
or K JPEG/WebP files whose lengths the header lists. Every field of an incoming
message is checked before anything reaches the model; a bad message raises
:class:`WireError` whose ``reason`` is one of :data:`DROP_REASONS`, which the
receiver counts (per message) as ``buffer/dropped/<reason>``.

Why K samples per message (DESIGN §3 has one): a producer's batch shares one
inversion per source image and comes out of the decoder as one contiguous
``[K, H, W, 3]`` array. Sending it as one message costs one header encode, one
validation and one ZeroMQ message for K samples, where per-sample messages spend
more Python time per sample than ZeroMQ spends moving a 64x64 image (measured in
``bench/bench_stream.py``; see BENCHMARKS.md). K = 1 is the old layout.

Header schema (version :data:`SCHEMA_VERSION`). Message fields, one value each:

===============  =======  ===================================================
``v``            int      schema version
``producer_id``  str      stable name of the producer rank ("producer-0")
``session``      int      random id of this producer process (restart = new)
``seq``          int      per-session sequence number of the message's first
                          sample, >= 0; sample i has ``seq + i``
``rho``          float    transport range
``model_id``     str      generator id
``shape``        [int]*3  [H, W, 3] of every sample
``dtype``        str      "uint8"
``encoding``     str      "raw" | "jpeg" | "webp"
``created_at``   float    producer wall clock (unix seconds) when encoded
===============  =======  ===================================================

Sample fields, a list of K values each (sample i is element i):

===============  =======  ===================================================
``source_key``   str      key of the real sample the image was generated from
``caption``      str      the caption (non-empty)
``alpha``        float    transport shift drawn for this sample
``seed``         int      generation seed (with source_key/model_id: enough to regenerate)
``nbytes``       int      payload length of this sample in bytes
===============  =======  ===================================================

Optional: message fields ``mode`` (str), ``steps``, ``inversion_steps`` (int),
``guidance`` (float) from the sampler's provenance; the sample field
``sample_index`` (list of int); and ``stats`` (map ``"producer/<name>" -> number``),
the producer's own metrics forwarded now and then. A received sample's ``header``
is the message fields plus its own sample fields, with ``seq`` its own number.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq
from PIL import Image

SCHEMA_VERSION = 2
ENCODINGS = ("raw", "jpeg", "webp")
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}

#: Every reason a message can be dropped for; the receiver reports each as ``buffer/dropped/<reason>``.
DROP_REASONS = (
    "frame_count",  # not exactly [header, payload]
    "oversized",  # payload or whole message above the configured limits
    "header_too_large",
    "not_msgpack",
    "not_a_map",
    "version",  # missing or unsupported schema version
    "missing_field",
    "wrong_type",
    "bad_value",  # NaN alpha, unknown encoding/dtype, negative seq or nbytes, empty caption ...
    "bad_shape",  # negative, zero or absurd dimensions, channels != 3
    "bad_count",  # sample columns of different lengths, none, or more than allowed
    "caption_too_long",
    "size_mismatch",  # nbytes / H*W*3 disagree with the payload length
    "undecodable",  # JPEG/WebP that does not decode to the declared shape
    "bad_stats",  # malformed forwarded producer stats
)

_INT, _FLOAT, _STR = "int", "float", "str"
_MESSAGE_FIELDS: dict[str, str] = {
    "producer_id": _STR,
    "session": _INT,
    "seq": _INT,
    "rho": _FLOAT,
    "model_id": _STR,
    "dtype": _STR,
    "encoding": _STR,
    "created_at": _FLOAT,
}
_OPTIONAL_MESSAGE_FIELDS: dict[str, str] = {
    "mode": _STR,
    "steps": _INT,
    "inversion_steps": _INT,
    "guidance": _FLOAT,
}
#: Per-sample fields: lists of K values on the wire, scalars in a received sample's header.
SAMPLE_FIELDS: dict[str, str] = {
    "source_key": _STR,
    "caption": _STR,
    "alpha": _FLOAT,
    "seed": _INT,
    "nbytes": _INT,
}
_OPTIONAL_SAMPLE_FIELDS: dict[str, str] = {"sample_index": _INT}
_COLUMNS = (*SAMPLE_FIELDS, *_OPTIONAL_SAMPLE_FIELDS)
# Exact types: bool is not an int here, and msgpack yields only these.
_KIND_TYPES = {_INT: frozenset((int,)), _FLOAT: frozenset((int, float)), _STR: frozenset((str,))}
_MISSING = object()
_MAX_SHORT_STR = 256  # producer_id, source_key, model_id, mode
_MAX_STATS = 64


class WireError(ValueError):
    """A message that must be dropped; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class WireLimits:
    """What a receiver accepts. ``max_message_bytes`` is also set as ZeroMQ's ``MAXMSGSIZE``
    (per frame; libzmq disconnects a peer that exceeds it), the other limits are checked here."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_side: int = 2048
    max_caption_chars: int = 1024
    max_samples_per_message: int = 256

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_side", "max_caption_chars",
                     "max_samples_per_message"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_header_bytes >= self.max_message_bytes:
            raise ValueError(
                f"max_header_bytes must be < max_message_bytes, got {self.max_header_bytes} >= {self.max_message_bytes}"
            )


@dataclass(slots=True)
class SyntheticSample:
    """One validated sample. ``image`` is uint8 HxWx3 and read-only (it may share the
    received ZeroMQ frame's memory); copy it before modifying in place."""

    image: np.ndarray
    caption: str
    header: dict[str, Any]
    received_at: float = field(default_factory=time.time)


class SampleBatch:
    """The K validated samples of one message, kept as received: the header's columns
    and the ``[K, H, W, 3]`` images (for raw payloads, a view of the ZeroMQ frame).

    A sequence of :class:`SyntheticSample`, built on access: a receiver creates no
    Python object per sample, so inserting a message into the
    :class:`~edsam_online.buffer.ReplayBuffer` costs the same for 1 or 256 samples;
    only samples that are drawn get their own header dict.
    """

    __slots__ = ("header", "images", "received_at")

    def __init__(self, header: dict[str, Any], images: np.ndarray, received_at: float) -> None:
        self.header = header
        self.images = images
        self.received_at = received_at

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> SyntheticSample:
        k = len(self.images)
        if not -k <= i < k:
            raise IndexError(f"sample {i} of {k}")
        i %= k
        header = self.header
        sample_header = {name: value for name, value in header.items() if name not in _COLUMNS and name != "stats"}
        for name in _COLUMNS:
            if name in header:
                sample_header[name] = header[name][i]
        sample_header["seq"] = header["seq"] + i
        return SyntheticSample(self.images[i], sample_header["caption"], sample_header, self.received_at)


# ----------------------------------------------------------------------------- encoding


def encode_image(image: np.ndarray, encoding: str = "raw", quality: int = 90) -> bytes | memoryview:
    """Payload bytes for ``image`` (uint8 HxWx3, or KxHxWx3 for raw). ``raw`` returns a view without copying."""
    if encoding == "raw":
        return memoryview(np.ascontiguousarray(image)).cast("B")
    if encoding not in _PIL_FORMATS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    out = io.BytesIO()
    Image.fromarray(image, "RGB").save(out, format=_PIL_FORMATS[encoding], quality=quality)
    return out.getvalue()


def encode_message(
    images: np.ndarray, header_fields: dict[str, Any], encoding: str = "raw", quality: int = 90
) -> list[bytes | zmq.Frame]:
    """Build ``[header, payload]`` for ``socket.send_multipart(frames, copy=False)``.

    ``images``: one image ``[H, W, 3]`` or K images ``[K, H, W, 3]``, uint8.
    ``header_fields``: the message fields of the schema (all but ``v``, ``shape``,
    ``dtype``, ``encoding``, ``created_at``, which are filled in here) and the sample
    fields (all but ``nbytes``) as lists of K values; for a single ``[H, W, 3]``
    image they may be plain values. A raw payload is a :class:`zmq.Frame` over the
    images' memory: pyzmq sends it zero-copy above its copy threshold (64 KB) and
    copies below it. The caller must not modify ``images`` until the message is sent.
    """
    images = _check_images(images)
    k = len(images)
    header = dict(header_fields)
    for name in _COLUMNS:
        if name in header and name != "nbytes" and not isinstance(header[name], list):
            if k != 1:
                raise ValueError(f"header field {name} must be a list of {k} values for {k} images")
            header[name] = [header[name]]
    if encoding == "raw":
        payload = encode_image(images, "raw")
        header["nbytes"] = [len(payload) // k] * k
    else:
        parts = [encode_image(img, encoding, quality) for img in images]
        header["nbytes"] = [len(p) for p in parts]
        payload = b"".join(parts)
    header.update(v=SCHEMA_VERSION, shape=[int(s) for s in images.shape[1:]], dtype="uint8", encoding=encoding,
                  created_at=time.time())
    for name, kind in _MESSAGE_FIELDS.items():
        if name not in header:
            raise ValueError(f"header_fields is missing {name!r}")
        if type(header[name]) not in _KIND_TYPES[kind]:
            raise ValueError(f"header field {name} must be {kind}, got {type(header[name]).__name__}")
    for name, kind in (*SAMPLE_FIELDS.items(), *_OPTIONAL_SAMPLE_FIELDS.items()):
        if name not in header:
            if name in SAMPLE_FIELDS:
                raise ValueError(f"header_fields is missing {name!r}")
            continue
        column = header[name]
        if len(column) != k or not _KIND_TYPES[kind].issuperset(map(type, column)):
            raise ValueError(f"header field {name} must be {k} values of type {kind}")
    return [msgpack.packb(header, use_bin_type=True), zmq.Frame(payload, copy=None)]


def _check_images(images: Any) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got {type(images).__name__} {getattr(images, 'dtype', '')}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[3] != 3 or min(images.shape) < 1:
        raise ValueError(f"images must have shape [H, W, 3] or [K, H, W, 3], got {list(images.shape)}")
    return images


# ----------------------------------------------------------------------------- decoding


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def _check_field(header: dict, name: str, kind: str, required: bool) -> None:
    value = header.get(name, _MISSING)
    if value is _MISSING:
        if required:
            raise WireError("missing_field", name)
    elif type(value) not in _KIND_TYPES[kind]:
        raise WireError("wrong_type", f"{name} must be {kind}, got {type(value).__name__}")


def _check_column(header: dict, name: str, kind: str, k: int) -> None:
    column = header[name]
    if type(column) is not list:
        raise WireError("wrong_type", f"{name} must be a list, got {type(column).__name__}")
    if len(column) != k:
        raise WireError("bad_count", f"{name} has {len(column)} values, nbytes has {k}")
    if not _KIND_TYPES[kind].issuperset(map(type, column)):
        raise WireError("wrong_type", f"{name} must hold {kind} values")


def decode_header(data: memoryview | bytes, limits: WireLimits) -> dict[str, Any]:
    """Unpack and validate a header frame (everything but the payload itself)."""
    if len(data) > limits.max_header_bytes:
        raise WireError("header_too_large", f"{len(data)} > {limits.max_header_bytes} bytes")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as err:  # noqa: BLE001 - any unpack failure is the peer's defect
        raise WireError("not_msgpack", type(err).__name__) from None
    if not isinstance(header, dict):
        raise WireError("not_a_map", type(header).__name__)
    if "v" not in header:
        raise WireError("version", "missing")
    if header["v"] != SCHEMA_VERSION or isinstance(header["v"], bool):
        raise WireError("version", f"unsupported {header['v']!r}")
    for name, kind in _MESSAGE_FIELDS.items():
        _check_field(header, name, kind, required=True)
    for name, kind in _OPTIONAL_MESSAGE_FIELDS.items():
        _check_field(header, name, kind, required=False)
    for name in SAMPLE_FIELDS:
        if name not in header:
            raise WireError("missing_field", name)
    nbytes = header["nbytes"]
    if type(nbytes) is not list:
        raise WireError("wrong_type", f"nbytes must be a list, got {type(nbytes).__name__}")
    k = len(nbytes)
    if not 1 <= k <= limits.max_samples_per_message:
        raise WireError("bad_count", f"{k} samples (1..{limits.max_samples_per_message} allowed)")
    for name, kind in SAMPLE_FIELDS.items():
        _check_column(header, name, kind, k)
    for name, kind in _OPTIONAL_SAMPLE_FIELDS.items():
        if name in header:
            _check_column(header, name, kind, k)
    if "shape" not in header:
        raise WireError("missing_field", "shape")
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int for s in shape):
        raise WireError("wrong_type", "shape must be a list of 3 ints")
    h, w, c = shape
    if c != 3 or not (1 <= h <= limits.max_side and 1 <= w <= limits.max_side):
        raise WireError("bad_shape", f"{shape} (max side {limits.max_side}, 3 channels)")
    for name in ("producer_id", "model_id", "mode"):
        if len(header.get(name, "")) > _MAX_SHORT_STR:
            raise WireError("bad_value", f"{name} longer than {_MAX_SHORT_STR}")
    if max(map(len, header["source_key"])) > _MAX_SHORT_STR:
        raise WireError("bad_value", f"source_key longer than {_MAX_SHORT_STR}")
    if not header["producer_id"]:
        raise WireError("bad_value", "empty producer_id")
    captions = header["caption"]
    longest = max(map(len, captions))
    if longest > limits.max_caption_chars:
        raise WireError("caption_too_long", f"{longest} > {limits.max_caption_chars} chars")
    if "" in captions or any(map(str.isspace, captions)):
        raise WireError("bad_value", "empty caption")
    for name in ("rho", "created_at", "guidance"):
        if name in header and not math.isfinite(header[name]):
            raise WireError("bad_value", f"{name} is not finite")
    if not all(map(math.isfinite, header["alpha"])):
        raise WireError("bad_value", "alpha is not finite")
    if header["seq"] < 0 or header["rho"] < 0 or min(nbytes) < 0:
        raise WireError("bad_value", "negative seq, nbytes or rho")
    if header["dtype"] != "uint8":
        raise WireError("bad_value", f"dtype {header['dtype']!r}")
    if header["encoding"] not in ENCODINGS:
        raise WireError("bad_value", f"encoding {header['encoding']!r}")
    if "stats" in header:
        _check_stats(header["stats"])
    return header


def _check_stats(stats: Any) -> None:
    if not isinstance(stats, dict) or len(stats) > _MAX_STATS:
        raise WireError("bad_stats", "stats must be a map of at most 64 entries")
    for key, value in stats.items():
        if not (isinstance(key, str) and key.startswith("producer/") and len(key) <= 128):
            raise WireError("bad_stats", f"key {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WireError("bad_stats", f"value of {key}")


def decode_payload(header: dict[str, Any], payload: memoryview | bytes) -> np.ndarray:
    """The K images of a validated header as uint8 [K, H, W, 3] (read-only for raw payloads)."""
    h, w, c = header["shape"]
    nbytes = header["nbytes"]
    n = len(payload)
    if sum(nbytes) != n:
        raise WireError("size_mismatch", f"header says {sum(nbytes)} bytes, payload has {n}")
    encoding = header["encoding"]
    if encoding == "raw":
        if nbytes.count(h * w * c) != len(nbytes):
            raise WireError("size_mismatch", f"shape {header['shape']} needs {h * w * c} bytes per sample")
        images = np.frombuffer(payload, dtype=np.uint8).reshape(len(nbytes), h, w, c)
        images.flags.writeable = False
        return images
    images = np.empty((len(nbytes), h, w, c), np.uint8)
    offset = 0
    for i, size in enumerate(nbytes):
        images[i] = _decode_file(payload[offset:offset + size], _PIL_FORMATS[encoding], h, w)
        offset += size
    return images


def _decode_file(data: memoryview | bytes, fmt: str, h: int, w: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            # The declared shape is bounded by max_side: compare before decoding so a
            # small file cannot expand into a huge image (decompression bomb).
            if img.size != (w, h):
                raise WireError("undecodable", f"{fmt} is {img.size[0]}x{img.size[1]}, header says {w}x{h}")
            img.load()
            return np.asarray(img.convert("RGB"))
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many kinds
        raise WireError("undecodable", f"{type(err).__name__}: {err}") from None


def decode_message(
    frames: Sequence[Any], limits: WireLimits, received_at: float | None = None
) -> tuple[dict[str, Any], SampleBatch]:
    """Validate a received multipart message: (its header, its K samples as a
    :class:`SampleBatch`). Raises :class:`WireError` for any defect.

    All or nothing: one bad sample drops the whole message (its producer is faulty).
    """
    if len(frames) != 2:
        raise WireError("frame_count", f"{len(frames)} frames")
    header_buf, payload_buf = _buffer(frames[0]), _buffer(frames[1])
    total = len(header_buf) + len(payload_buf)
    if total > limits.max_message_bytes:
        raise WireError("oversized", f"{total} > {limits.max_message_bytes} bytes")
    header = decode_header(header_buf, limits)
    images = decode_payload(header, payload_buf)
    return header, SampleBatch(header, images, time.time() if received_at is None else received_at)
