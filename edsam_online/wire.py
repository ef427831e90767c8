"""Wire format: a two-frame ZeroMQ message ``[header, payload]`` carrying K >= 1 samples.

``header`` is msgpack (never pickle: a network peer must not be able to run
code on a trainer), ``payload`` the K images back to back: raw uint8 HxWx3 each,
or K JPEG/WebP files whose lengths the header lists. Every field of an incoming
message is checked before anything reaches the model; a bad message raises
:class:`WireError` whose ``reason`` is one of :data:`DROP_REASONS`, which the
receiver counts (per message) as ``buffer/dropped/<reason>``.

Why K samples per message: a producer's batch shares one
inversion per source image and comes out of the decoder as one contiguous
``[K, H, W, 3]`` array. Sending it as one message costs one header encode, one
validation and one ZeroMQ message for K samples, where per-sample messages spend
more Python time per sample than ZeroMQ spends moving a 64x64 image (measured in
``bench/bench_stream.py``; see BENCHMARKS.md). K = 1 is the old layout.

Why binary columns and a source table (schema 3; schema 2 sent msgpack lists): the
numbers of K samples travel as K little-endian values in one msgpack ``bin`` each,
validated with one numpy call and kept as one array, and the M samples generated from
one source image share one ``source_key``/``caption`` entry. A received message is then
a few dozen Python objects instead of ~6 per sample, which is what a receiver spends its
time creating, checking and (on eviction) freeing. The sender writes the sampler's own
columns (:class:`~edsam_online.diffusion.GeneratedBatch`) as they are.

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

Source table, U entries (1 <= U <= K), one per source image:

===============  =======  ===================================================
``source_key``   [str]    key of the real sample the images were generated from
``caption``      [str]    its caption (non-empty)
===============  =======  ===================================================

Sample columns, K little-endian values packed in one ``bin`` each (sample i is element i):

===============  =======  ===================================================
``source``       <u4      the sample's entry in the source table
``alpha``        <f8      transport shift drawn for this sample
``seed``         <i8      generation seed (with source_key/model_id: enough to regenerate)
``nbytes``       <u8      payload length of this sample in bytes
===============  =======  ===================================================

Optional (a receiver accepts a message without them; :func:`encode_message` writes all
but ``stats``, and ``score`` when the batch has none): message fields ``mode`` (str),
``steps``, ``inversion_steps`` (int), ``guidance`` (float) from the sampler's settings; the
sample columns ``sample_index`` (<i8) and ``score`` (<f4, in [0, 1]: the producer's
fidelity score of the sample against its caption); ``stats`` (map
``"producer/<name>" -> number``), the producer's own metrics forwarded now and then; and
``feedback`` (str, ``tcp://`` or ``ipc://``), the endpoint where a producer steered by
the trainers' loss takes their reports (:mod:`edsam_online.feedback`). A
received sample (:class:`SyntheticSample`) holds what training reads (image, caption,
source key, alpha, score); its full ``header`` (the message fields plus
its own source entry and column values as Python scalars, ``seq`` its own number) is
built when asked for.

Optional source thumbnails (``producer.source_thumb_px``), both fields or neither:

===================  =======  ===============================================
``source_thumb_px``  int      side S of every thumbnail, 1 <= S <= :data:`MAX_THUMB_PX`
``source_thumb``     bin      U thumbnails of the source images, uint8 RGB
                              ``[U, S, S, 3]`` row-major: entry u is source u's
===================  =======  ===============================================

They let logged samples show the image they were generated from (a sample's
:attr:`SyntheticSample.source_thumb`). One per source, not per sample: the M samples of
a source share it, so 32 px cost 3 KB per source image. They travel in the header and
count towards ``max_header_bytes`` (a producer halves a message whose header is too big).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import msgpack
import numpy as np
import zmq
from PIL import Image

if TYPE_CHECKING:  # the sender's type only: receivers never import the diffusion stack
    from edsam_online.diffusion import GeneratedBatch

SCHEMA_VERSION = 3
ENCODINGS = ("raw", "jpeg", "webp")
#: What a producer's advertised ``feedback`` endpoint may start with.
FEEDBACK_TRANSPORTS = ("tcp://", "ipc://")
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}
#: The largest source thumbnail side a message may carry (a thumbnail, not a second image).
MAX_THUMB_PX = 128

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
    "bad_value",  # NaN alpha, score outside [0, 1], unknown encoding/dtype, negative seq, empty caption ...
    "bad_shape",  # negative, zero or absurd dimensions, channels != 3, a thumbnail side out of range
    "bad_count",  # columns of different lengths, none, more than allowed, or a source table longer than K
    "caption_too_long",
    "size_mismatch",  # nbytes / H*W*3 disagree with the payload length; thumbnails of the wrong size
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
    "feedback": _STR,
}
_SOURCE_FIELDS = ("source_key", "caption")
#: Sample columns and their wire dtypes; ``nbytes`` comes first: it defines K.
_COLUMN_DTYPES: dict[str, np.dtype] = {
    "nbytes": np.dtype("<u8"),
    "source": np.dtype("<u4"),
    "alpha": np.dtype("<f8"),
    "seed": np.dtype("<i8"),
}
_OPTIONAL_COLUMN_DTYPES: dict[str, np.dtype] = {"sample_index": np.dtype("<i8"), "score": np.dtype("<f4")}
_ALL_COLUMNS = {**_COLUMN_DTYPES, **_OPTIONAL_COLUMN_DTYPES}
#: The numpy kinds :func:`encode_message` accepts for each column: ints are floats, bools are neither.
_COLUMN_KINDS: dict[str, str] = {"source": "iu", "alpha": "fiu", "seed": "iu", "sample_index": "iu", "score": "fiu"}
# Exact types: bool is not an int here, and msgpack yields only these.
_KIND_TYPES = {_INT: frozenset((int,)), _FLOAT: frozenset((int, float)), _STR: frozenset((str,))}
#: (name, kind, accepted exact types, required) for every top-level header field but ``v``.
_FIELD_CHECKS = (
    *((name, kind, _KIND_TYPES[kind], True) for name, kind in _MESSAGE_FIELDS.items()),
    *((name, kind, _KIND_TYPES[kind], False) for name, kind in _OPTIONAL_MESSAGE_FIELDS.items()),
)
_REQUIRED_PRESENT = (*_SOURCE_FIELDS, *_COLUMN_DTYPES, "shape")  # types checked where they are read
_MISSING = object()
_MAX_SHORT_STR = 256  # producer_id, source_key, model_id, mode
_MAX_STATS = 64
_THUMB_FIELDS = ("source_thumb_px", "source_thumb")
_NOT_PER_SAMPLE = frozenset((*_SOURCE_FIELDS, *_ALL_COLUMNS, *_THUMB_FIELDS, "stats"))


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
    """One validated sample: what the loader reads (``image``, ``caption``, ``source_key``,
    ``alpha``, ``score``: None when its producer scores nothing) and where it came from
    (sample ``index`` of ``batch``). ``image`` is uint8 HxWx3 and read-only (it may share the
    received ZeroMQ frame's memory); copy it before modifying in place."""

    image: np.ndarray
    caption: str
    source_key: str
    alpha: float
    score: float | None
    batch: SampleBatch
    index: int

    @property
    def header(self) -> dict[str, Any]:
        """Its full provenance (:meth:`SampleBatch.sample_header`), built on each access: for audits."""
        return self.batch.sample_header(self.index)

    @property
    def source_thumb(self) -> np.ndarray | None:
        """The thumbnail of its source image (uint8 ``[S, S, 3]``, read-only, a view shared by
        the source's samples), or None when its producer sent none."""
        return self.batch.source_thumb(self.index)


class SampleBatch:
    """The K validated samples of one message, kept as received: the header (its source
    table, and its columns as read-only numpy arrays) and the ``[K, H, W, 3]`` images
    (for raw payloads, a view of the ZeroMQ frame).

    A sequence of :class:`SyntheticSample`, built on access: a receiver creates no
    Python object per sample, so inserting a message into the
    :class:`~edsam_online.buffer.ReplayBuffer` costs the same for 1 or 256 samples;
    a drawn sample is four fields and a reference back here.
    """

    __slots__ = ("header", "images", "received_at")

    def __init__(self, header: dict[str, Any], images: np.ndarray, received_at: float) -> None:
        self.header = header
        self.images = images
        self.received_at = received_at

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        """Bytes of its K images (for raw payloads, the received frame's) and source thumbnails."""
        thumbs = self.header.get("source_thumb")
        return self.images.nbytes + (0 if thumbs is None else thumbs.nbytes)

    def _index(self, i: int) -> int:
        k = len(self.images)
        if not -k <= i < k:
            raise IndexError(f"sample {i} of {k}")
        return i % k

    def __getitem__(self, i: int) -> SyntheticSample:
        i = self._index(i)
        header = self.header
        source = header["source"][i]
        score = header.get("score")
        return SyntheticSample(self.images[i], header["caption"][source], header["source_key"][source],
                               float(header["alpha"][i]), None if score is None else float(score[i]), self, i)

    def source_thumb(self, i: int) -> np.ndarray | None:
        """Sample ``i``'s source thumbnail (None when the message has none)."""
        thumbs = self.header.get("source_thumb")
        return None if thumbs is None else thumbs[self.header["source"][self._index(i)]]

    def sample_header(self, i: int) -> dict[str, Any]:
        """Sample ``i``'s header: the message fields, its source entry and its column values
        (Python scalars), with ``seq`` its own number."""
        i = self._index(i)
        header = self.header
        sample_header = {name: value for name, value in header.items() if name not in _NOT_PER_SAMPLE}
        source = int(header["source"][i])
        for name in _SOURCE_FIELDS:
            sample_header[name] = header[name][source]
        for name in _ALL_COLUMNS:
            if name in header and name != "source":
                sample_header[name] = header[name][i].item()
        sample_header["seq"] = header["seq"] + i
        return sample_header


def provenance(batch: GeneratedBatch, row: int, producer_id: str, session: int, seq: int) -> dict[str, Any]:
    """Row ``row`` of ``batch``'s provenance as sample number ``seq`` of ``producer_id``'s
    ``session``: what a shard's JSON holds, each field with the value a receiver reads for the
    same sample from a message (:meth:`SampleBatch.sample_header`, beside the transport's own
    fields; tested). ``score`` only where the batch is scored."""
    source = int(batch.source[row])
    out = {
        "producer_id": producer_id, "session": session, "seq": seq, "source_key": batch.source_keys[source],
        "caption": batch.captions[source], "alpha": float(batch.alpha[row]), "seed": int(batch.seed[row]),
        "sample_index": int(batch.sample_index[row]), "rho": batch.rho, "model_id": batch.model_id,
        "mode": batch.mode, "steps": batch.steps, "inversion_steps": batch.inversion_steps, "guidance": batch.guidance,
    }
    if batch.score is not None:
        out["score"] = float(batch.score[row])
    return out


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
    batch: GeneratedBatch, producer_id: str, session: int, seq: int, stats: dict[str, float] | None = None,
    encoding: str = "raw", quality: int = 90, feedback: str | None = None,
) -> list[bytes | zmq.Frame]:
    """Build ``[header, payload]`` for ``socket.send_multipart(frames, copy=False)``.

    ``batch``: the K samples, as the sampler returns them (a
    :class:`~edsam_online.diffusion.GeneratedBatch` or a slice of one; a message of one
    sample: ``GeneratedBatch.single``). Its source table and columns become the header's
    as they are; ``producer_id``, ``session``, ``seq`` (the first sample's number) and the
    optional forwarded ``stats`` and ``feedback`` endpoint are the message's own fields. A raw payload is a
    :class:`zmq.Frame` over the images' memory: pyzmq sends it zero-copy above its copy
    threshold (64 KB) and copies below it. The caller must not modify the images until
    the message is sent. Raises ValueError naming a field of the wrong type or length.
    """
    images = _check_images(batch.images)
    k = len(images)
    header: dict[str, Any] = {
        "producer_id": producer_id, "session": session, "seq": seq, "rho": batch.rho, "model_id": batch.model_id,
        "mode": batch.mode, "steps": batch.steps, "inversion_steps": batch.inversion_steps, "guidance": batch.guidance,
    }
    for name, kind, types, _ in _FIELD_CHECKS:
        if name in header and type(header[name]) not in types:
            raise ValueError(f"header field {name} must be {kind}, got {type(header[name]).__name__}")
    if stats is not None:
        header["stats"] = stats
    if feedback is not None:
        header["feedback"] = feedback
    u = len(batch.source_keys)
    for name, values in (("source_keys", batch.source_keys), ("captions", batch.captions)):
        if (not isinstance(values, (list, tuple)) or len(values) != u or not 1 <= u <= k
                or not _KIND_TYPES[_STR].issuperset(map(type, values))):
            raise ValueError(f"{name} must be 1 to {k} str values, one per source (as many keys as captions)")
    header["source_key"], header["caption"] = batch.source_keys, batch.captions
    if batch.source_thumbs is not None:
        header["source_thumb_px"], header["source_thumb"] = _thumbs_field(batch.source_thumbs, u)
    columns = {name: np.asarray(getattr(batch, name)) for name in _COLUMN_KINDS
               if getattr(batch, name) is not None or name in _COLUMN_DTYPES}
    for name, column in columns.items():
        kinds = _COLUMN_KINDS[name]
        if column.shape != (k,) or column.dtype.kind not in kinds:
            raise ValueError(f"{name} must be {k} numbers ({'float' if 'f' in kinds else 'int'}), one per image")
    if columns["source"].min() < 0 or columns["source"].max() >= u:
        raise ValueError(f"source must index the {u} source_keys")
    if "score" in columns and not ((columns["score"] >= 0) & (columns["score"] <= 1)).all():
        raise ValueError("score must be in [0, 1] (and not NaN)")
    for name, column in columns.items():
        header[name] = column.astype(_ALL_COLUMNS[name], copy=False).tobytes()
    if encoding == "raw":
        payload = encode_image(images, "raw")
        sizes = np.full(k, len(payload) // k, _COLUMN_DTYPES["nbytes"])
    else:
        parts = [encode_image(img, encoding, quality) for img in images]
        sizes = np.array([len(p) for p in parts], _COLUMN_DTYPES["nbytes"])
        payload = b"".join(parts)
    header["nbytes"] = sizes.tobytes()
    header.update(v=SCHEMA_VERSION, shape=[int(s) for s in images.shape[1:]], dtype="uint8", encoding=encoding,
                  created_at=time.time())
    return [msgpack.packb(header, use_bin_type=True), zmq.Frame(payload, copy=None)]


def _thumbs_field(thumbs: Any, u: int) -> tuple[int, bytes]:
    """``source_thumb_px`` and ``source_thumb`` for ``u`` sources' thumbnails."""
    shape = getattr(thumbs, "shape", ())
    if (not isinstance(thumbs, np.ndarray) or thumbs.dtype != np.uint8 or len(shape) != 4 or shape[0] != u
            or shape[1] != shape[2] or shape[3] != 3 or not 1 <= shape[1] <= MAX_THUMB_PX):
        raise ValueError(f"source_thumbs must be a uint8 numpy array [{u}, S, S, 3] (one per source, "
                         f"1 <= S <= {MAX_THUMB_PX}), got {type(thumbs).__name__} {getattr(thumbs, 'dtype', '')} "
                         f"{list(shape)}")
    return int(shape[1]), np.ascontiguousarray(thumbs).tobytes()


def source_thumbnails(images: np.ndarray, side: int) -> np.ndarray | None:
    """Thumbnails ``[B, side, side, 3]`` of ``B`` source images (uint8 ``[B, H, W, 3]``),
    squashed to a square with PIL's antialiasing bilinear filter; None for ``side`` 0 (none)."""
    if side == 0:
        return None
    return np.stack([np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR)) for img in images])


def _check_images(images: Any) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got {type(images).__name__} {getattr(images, 'dtype', '')}")
    if images.ndim != 4 or images.shape[3] != 3 or min(images.shape) < 1:
        raise ValueError(f"images must have shape [K, H, W, 3], got {list(images.shape)}")
    return images


# ----------------------------------------------------------------------------- decoding


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def _check_fields(header: dict) -> None:
    for name, kind, types, required in _FIELD_CHECKS:
        value = header.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise WireError("missing_field", name)
        elif type(value) not in types:
            raise WireError("wrong_type", f"{name} must be {kind}, got {type(value).__name__}")
    for name in _REQUIRED_PRESENT:
        if name not in header:
            raise WireError("missing_field", name)


def _read_columns(header: dict, k: int) -> None:
    """Replace each ``bin`` column by a read-only array of its K values."""
    for name, dtype in _ALL_COLUMNS.items():
        value = header.get(name, _MISSING)
        if value is _MISSING:
            continue  # the required ones were checked
        if type(value) is not bytes:
            raise WireError("wrong_type", f"{name} must be bin ({k} x {dtype.str}), got {type(value).__name__}")
        if len(value) != k * dtype.itemsize:
            raise WireError("bad_count", f"{name} has {len(value)} bytes, {k} samples of {dtype.str} need "
                                         f"{k * dtype.itemsize}")
        header[name] = np.frombuffer(value, dtype)


def _read_source_table(header: dict, k: int) -> int:
    """Check ``source_key``/``caption`` (U str each, 1 <= U <= K); returns U."""
    keys, captions = header["source_key"], header["caption"]
    for name, value in (("source_key", keys), ("caption", captions)):
        if type(value) is not list:
            raise WireError("wrong_type", f"{name} must be a list, got {type(value).__name__}")
        if not _KIND_TYPES[_STR].issuperset(map(type, value)):
            raise WireError("wrong_type", f"{name} must hold str values")
    u = len(keys)
    if not 1 <= u <= k or len(captions) != u:
        raise WireError("bad_count", f"source table of {u} keys and {len(captions)} captions for {k} samples")
    return u


def _read_thumbs(header: dict, u: int) -> None:
    """Replace ``source_thumb`` by a read-only uint8 ``[U, S, S, 3]`` array (both thumbnail
    fields or neither)."""
    present = [name in header for name in _THUMB_FIELDS]
    if not any(present):
        return
    if not all(present):
        raise WireError("missing_field", f"{_THUMB_FIELDS[present.index(False)]} (the thumbnail fields go together)")
    side, data = header["source_thumb_px"], header["source_thumb"]
    if type(side) is not int:
        raise WireError("wrong_type", f"source_thumb_px must be int, got {type(side).__name__}")
    if type(data) is not bytes:
        raise WireError("wrong_type", f"source_thumb must be bin, got {type(data).__name__}")
    if not 1 <= side <= MAX_THUMB_PX:
        raise WireError("bad_shape", f"source_thumb_px {side} (1..{MAX_THUMB_PX})")
    if len(data) != u * side * side * 3:
        raise WireError("size_mismatch", f"source_thumb has {len(data)} bytes, {u} sources of {side}x{side}x3 need "
                                         f"{u * side * side * 3}")
    header["source_thumb"] = np.frombuffer(data, np.uint8).reshape(u, side, side, 3)


def decode_header(data: memoryview | bytes, limits: WireLimits) -> dict[str, Any]:
    """Unpack and validate a header frame (everything but the payload itself). The
    returned header holds each sample column as a read-only numpy array."""
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
    _check_fields(header)
    nbytes = header["nbytes"]
    if type(nbytes) is not bytes:
        raise WireError("wrong_type", f"nbytes must be bin, got {type(nbytes).__name__}")
    k, rest = divmod(len(nbytes), _COLUMN_DTYPES["nbytes"].itemsize)
    if rest or not 1 <= k <= limits.max_samples_per_message:
        raise WireError("bad_count", f"nbytes of {len(nbytes)} bytes (1..{limits.max_samples_per_message} samples allowed)")
    _read_columns(header, k)
    u = _read_source_table(header, k)
    _read_thumbs(header, u)
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int for s in shape):
        raise WireError("wrong_type", "shape must be a list of 3 ints")
    h, w, c = shape
    if c != 3 or not (1 <= h <= limits.max_side and 1 <= w <= limits.max_side):
        raise WireError("bad_shape", f"{shape} (max side {limits.max_side}, 3 channels)")
    _check_values(header, u, limits)
    if "stats" in header:
        _check_stats(header["stats"])
    return header


def _check_values(header: dict, u: int, limits: WireLimits) -> None:
    """The header's strings, captions, source indices and numbers are within bounds (its
    fields' types are already checked; ``u``: entries of the source table)."""
    for name in ("producer_id", "model_id", "mode", "feedback"):
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
    if int(header["source"].max()) >= u:
        raise WireError("bad_value", f"source index {int(header['source'].max())} >= {u} table entries")
    for name in ("rho", "created_at", "guidance"):
        if name in header and not math.isfinite(header[name]):
            raise WireError("bad_value", f"{name} is not finite")
    if not np.isfinite(header["alpha"]).all():
        raise WireError("bad_value", "alpha is not finite")
    if "score" in header and not ((header["score"] >= 0) & (header["score"] <= 1)).all():  # False for NaN
        raise WireError("bad_value", "score outside [0, 1] or NaN")
    if header["seq"] < 0 or header["rho"] < 0:
        raise WireError("bad_value", "negative seq or rho")
    if header["dtype"] != "uint8":
        raise WireError("bad_value", f"dtype {header['dtype']!r}")
    if header["encoding"] not in ENCODINGS:
        raise WireError("bad_value", f"encoding {header['encoding']!r}")
    if "feedback" in header and not header["feedback"].startswith(FEEDBACK_TRANSPORTS):
        raise WireError("bad_value", f"feedback endpoint {header['feedback']!r} is not one of {FEEDBACK_TRANSPORTS}")


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
    k, n = len(nbytes), len(payload)
    encoding = header["encoding"]
    if encoding == "raw":
        if n != k * h * w * c or not (nbytes == h * w * c).all():
            raise WireError("size_mismatch", f"{k} samples of shape {header['shape']} need {h * w * c} bytes each, "
                                             f"payload has {n}")
        images = np.frombuffer(payload, dtype=np.uint8).reshape(k, h, w, c)
        images.flags.writeable = False
        return images
    if int(nbytes.max()) > n or int(nbytes.sum()) != n:  # max first: the u8 sum cannot wrap around
        raise WireError("size_mismatch", f"header says {int(nbytes.sum(dtype=object))} bytes, payload has {n}")
    images = np.empty((k, h, w, c), np.uint8)
    offset = 0
    for i, size in enumerate(nbytes.tolist()):
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
