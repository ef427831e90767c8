"""Wire format of one synthetic sample: a two-frame ZeroMQ message ``[header, payload]``.

``header`` is msgpack (never pickle: a network peer must not be able to run
code on a trainer), ``payload`` the image bytes: raw uint8 HxWx3, JPEG or WebP.
Every field of an incoming message is checked before anything reaches the
model; a bad message raises :class:`WireError` whose ``reason`` is one of
:data:`DROP_REASONS`, which the receiver counts as ``buffer/dropped/<reason>``.

Header schema (version :data:`SCHEMA_VERSION`), required fields and types:

===============  =======  ===================================================
``v``            int      schema version
``producer_id``  str      stable name of the producer rank ("producer-0")
``session``      int      random id of this producer process (restart = new)
``seq``          int      per-session sequence number of sent messages, >= 0
``source_key``   str      key of the real sample the image was generated from
``caption``      str      the caption (non-empty)
``alpha``        float    transport shift drawn for this sample
``rho``          float    transport range
``seed``         int      generation seed (with source_key/model_id: enough to regenerate)
``model_id``     str      generator id
``shape``        [int]*3  [H, W, 3]
``dtype``        str      "uint8"
``encoding``     str      "raw" | "jpeg" | "webp"
``nbytes``       int      payload length in bytes
``created_at``   float    producer wall clock (unix seconds) when encoded
===============  =======  ===================================================

Optional: ``mode`` (str), ``steps``, ``inversion_steps``, ``sample_index`` (int),
``guidance`` (float) from the sampler's provenance, and ``stats`` (map ``"producer/<name>" -> number``),
the producer's own metrics forwarded every N messages.
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

SCHEMA_VERSION = 1
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
    "caption_too_long",
    "size_mismatch",  # nbytes / H*W*3 disagree with the payload length
    "undecodable",  # JPEG/WebP that does not decode to the declared shape
    "bad_stats",  # malformed forwarded producer stats
)

_INT, _FLOAT, _STR = "int", "float", "str"
_REQUIRED: dict[str, str] = {
    "producer_id": _STR,
    "session": _INT,
    "seq": _INT,
    "source_key": _STR,
    "caption": _STR,
    "alpha": _FLOAT,
    "rho": _FLOAT,
    "seed": _INT,
    "model_id": _STR,
    "dtype": _STR,
    "encoding": _STR,
    "nbytes": _INT,
    "created_at": _FLOAT,
}
_OPTIONAL: dict[str, str] = {
    "mode": _STR,
    "steps": _INT,
    "inversion_steps": _INT,
    "sample_index": _INT,
    "guidance": _FLOAT,
}
_KIND_TYPES = {_INT: (int,), _FLOAT: (int, float), _STR: (str,)}
_REQUIRED_TYPES = tuple((name, _KIND_TYPES[kind]) for name, kind in _REQUIRED.items())
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

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_side", "max_caption_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_header_bytes >= self.max_message_bytes:
            raise ValueError(
                f"max_header_bytes must be < max_message_bytes, got {self.max_header_bytes} >= {self.max_message_bytes}"
            )


@dataclass
class SyntheticSample:
    """One validated sample. ``image`` is uint8 HxWx3 and read-only (it may share the
    received ZeroMQ frame's memory); copy it before modifying in place."""

    image: np.ndarray
    caption: str
    header: dict[str, Any]
    received_at: float = field(default_factory=time.time)


# ----------------------------------------------------------------------------- encoding


def encode_image(image: np.ndarray, encoding: str = "raw", quality: int = 90) -> bytes | memoryview:
    """Payload bytes for ``image`` (uint8 HxWx3). ``raw`` returns a view without copying."""
    _check_image(image)
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
    image: np.ndarray, header_fields: dict[str, Any], encoding: str = "raw", quality: int = 90
) -> list[bytes | zmq.Frame]:
    """Build ``[header, payload]`` for ``socket.send_multipart(frames, copy=False)``.

    ``header_fields`` holds the per-sample fields of the schema (everything but
    ``v``, ``shape``, ``dtype``, ``encoding``, ``nbytes``, ``created_at``, which are
    filled in here). The payload is a :class:`zmq.Frame` over the image memory:
    pyzmq sends it zero-copy above its copy threshold (64 KB) and copies below it,
    where zero-copy costs more than it saves. The caller must not modify
    ``image`` until the message has been sent.
    """
    payload = encode_image(image, encoding, quality)
    header = dict(header_fields)
    header.update(
        v=SCHEMA_VERSION,
        shape=[int(s) for s in image.shape],
        dtype="uint8",
        encoding=encoding,
        nbytes=len(payload),
        created_at=time.time(),
    )
    for name, kind in _REQUIRED.items():
        if name not in header:
            raise ValueError(f"header_fields is missing {name!r}")
        _check_type(header, name, kind, exc=ValueError)
    return [msgpack.packb(header, use_bin_type=True), zmq.Frame(payload, copy=None)]


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {type(image).__name__} {getattr(image, 'dtype', '')}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape [H, W, 3], got {list(image.shape)}")


# ----------------------------------------------------------------------------- decoding


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def _check_type(header: dict, name: str, kind: str, exc: type[Exception] = WireError) -> None:
    value = header[name]
    if kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == _FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        if exc is WireError:
            raise WireError("wrong_type", f"{name} must be {kind}, got {type(value).__name__}")
        raise exc(f"header field {name} must be {kind}, got {type(value).__name__}")


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
    for name, allowed in _REQUIRED_TYPES:
        value = header.get(name, _MISSING)
        if type(value) not in allowed:  # exact types: bool is not an int here
            if value is _MISSING:
                raise WireError("missing_field", name)
            _check_type(header, name, _REQUIRED[name])
            raise WireError("wrong_type", f"{name} is {type(value).__name__}")  # int/str subclasses
    for name, kind in _OPTIONAL.items():
        if name in header:
            _check_type(header, name, kind)
    if "shape" not in header:
        raise WireError("missing_field", "shape")
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape
    ):
        raise WireError("wrong_type", "shape must be a list of 3 ints")
    h, w, c = shape
    if c != 3 or not (1 <= h <= limits.max_side and 1 <= w <= limits.max_side):
        raise WireError("bad_shape", f"{shape} (max side {limits.max_side}, 3 channels)")
    for name in ("producer_id", "source_key", "model_id", "mode"):
        if len(header.get(name, "")) > _MAX_SHORT_STR:
            raise WireError("bad_value", f"{name} longer than {_MAX_SHORT_STR}")
    if not header["producer_id"]:
        raise WireError("bad_value", "empty producer_id")
    caption = header["caption"]
    if len(caption) > limits.max_caption_chars:
        raise WireError("caption_too_long", f"{len(caption)} > {limits.max_caption_chars} chars")
    if not caption.strip():
        raise WireError("bad_value", "empty caption")
    for name in ("alpha", "rho", "created_at", "guidance"):
        if name in header and not math.isfinite(header[name]):
            raise WireError("bad_value", f"{name} is not finite")
    if header["seq"] < 0 or header["nbytes"] < 0 or header["rho"] < 0:
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


def decode_payload(header: dict[str, Any], payload: memoryview | bytes, limits: WireLimits) -> np.ndarray:
    """The image of a validated header, as uint8 HxWx3 (read-only for raw payloads)."""
    h, w, c = header["shape"]
    n = len(payload)
    if header["nbytes"] != n:
        raise WireError("size_mismatch", f"header says {header['nbytes']} bytes, payload has {n}")
    encoding = header["encoding"]
    if encoding == "raw":
        if n != h * w * c:
            raise WireError("size_mismatch", f"shape {header['shape']} needs {h * w * c} bytes, payload has {n}")
        image = np.frombuffer(payload, dtype=np.uint8).reshape(h, w, c)
        image.flags.writeable = False
        return image
    fmt = _PIL_FORMATS[encoding]
    try:
        with Image.open(io.BytesIO(payload), formats=[fmt]) as img:
            # The declared shape is bounded by max_side: compare before decoding so a
            # small file cannot expand into a huge image (decompression bomb).
            if img.size != (w, h):
                raise WireError("undecodable", f"{fmt} is {img.size[0]}x{img.size[1]}, header says {w}x{h}")
            img.load()
            image = np.asarray(img.convert("RGB"))
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many kinds
        raise WireError("undecodable", f"{type(err).__name__}: {err}") from None
    return image


def decode_message(frames: Sequence[Any], limits: WireLimits, received_at: float | None = None) -> SyntheticSample:
    """Validate a received multipart message; raises :class:`WireError` for any defect."""
    if len(frames) != 2:
        raise WireError("frame_count", f"{len(frames)} frames")
    header_buf, payload_buf = _buffer(frames[0]), _buffer(frames[1])
    total = len(header_buf) + len(payload_buf)
    if total > limits.max_message_bytes:
        raise WireError("oversized", f"{total} > {limits.max_message_bytes} bytes")
    header = decode_header(header_buf, limits)
    image = decode_payload(header, payload_buf, limits)
    return SyntheticSample(
        image=image,
        caption=header["caption"],
        header=header,
        received_at=time.time() if received_at is None else received_at,
    )
