"""A trainer's replay buffer as a file (``checkpoint.buffer``): the format of one rank's snapshot.

An ``.npz`` of plain arrays, read with ``np.load(allow_pickle=False)``, whose scalars and
strings are msgpack: nothing in it is unpickled. Arrays: ``meta`` (msgpack bytes, below),
``pixels`` (uint8: every item's image as the buffer holds it, decoded, back to back), per item
oldest first ``uses``, ``inserted_step`` (int64) and ``age_s`` (float64), ``reuse_hist``
(int64) and ``rng`` (the sampling RNG's state words, int64; empty without one). ``meta``:
``format``, ``step``, ``counters`` (the table's :data:`~edsam_online.buffer.COUNTERS`), ``rng``
(``[version, gauss_next]`` or nil) and ``messages``: ``{header: bin, received_at: float}`` each.

A run of consecutive items that are consecutive rows of one received message
(:class:`~edsam_online.wire.SampleBatch`) is saved as a message of its own: its wire header
with the sample columns and the source table (thumbnails included) cut to those rows and
``seq`` moved to the first of them, so each restored sample has the saved one's provenance
(:meth:`~edsam_online.wire.SampleBatch.sample_header`). A restored header passes
:func:`~edsam_online.wire.decode_header` like a received one: a file is input, not trusted.
"""

from __future__ import annotations

import os
from typing import IO, Any, Iterator

import msgpack
import numpy as np

from edsam_online.buffer import BufferSnapshot
from edsam_online.wire import SampleBatch, SyntheticSample, WireLimits, decode_header

FORMAT = 1


def write_snapshot(file: IO[bytes], snap: BufferSnapshot[SyntheticSample]) -> None:
    """Write ``snap`` to ``file``: a trainer buffer's, whose items are rows of received messages
    (:class:`SampleBatch`)."""
    messages, pixels = [], []
    for batch, lo, hi in _runs(snap):
        if not isinstance(batch, SampleBatch):
            raise TypeError(f"a buffer snapshot holds received samples, not {type(batch).__name__} items")
        messages.append({"header": msgpack.packb(_header(batch, lo, hi), use_bin_type=True),
                         "received_at": float(batch.received_at)})
        pixels.append(np.ascontiguousarray(batch.images[lo:hi]).reshape(-1))
    rng = snap.rng_state
    meta = {"format": FORMAT, "step": int(snap.step), "messages": messages,
            "counters": {name: float(v) if name == "forgiven" else int(v) for name, v in snap.counters.items()},
            "rng": None if rng is None else [rng[0], rng[2]]}
    np.savez(file, meta=np.frombuffer(msgpack.packb(meta, use_bin_type=True), np.uint8),
             pixels=np.concatenate(pixels) if pixels else np.zeros(0, np.uint8),
             uses=snap.uses.astype(np.int64), inserted_step=snap.inserted_step.astype(np.int64),
             age_s=snap.age_s.astype(np.float64), reuse_hist=snap.reuse_hist.astype(np.int64),
             rng=np.asarray(rng[1] if rng is not None else (), np.int64))


def _runs(snap: BufferSnapshot) -> Iterator[tuple[Any, int, int]]:
    """``(sequence, lo, hi)``: each run of items that are rows ``lo:hi`` of one sequence, in order."""
    index, start = snap.index.tolist(), 0
    for i in range(1, len(index) + 1):
        if i == len(index) or snap.seqs[i] is not snap.seqs[i - 1] or index[i] != index[i - 1] + 1:
            yield snap.seqs[start], index[start], index[i - 1] + 1
            start = i


def _header(batch: SampleBatch, lo: int, hi: int) -> dict[str, Any]:
    """The wire header of rows ``lo:hi`` of ``batch`` as a message of their own (module doc);
    forwarded producer ``stats`` are no sample's and stay behind."""
    header = batch.header
    used, source = np.unique(header["source"][lo:hi], return_inverse=True)
    out: dict[str, Any] = {}
    for name, value in header.items():
        if name in ("source_key", "caption"):
            out[name] = [value[u] for u in used.tolist()]
        elif name == "source_thumb":
            out[name] = value[used].tobytes()
        elif isinstance(value, np.ndarray):  # a sample column
            out[name] = value[lo:hi].tobytes()
        elif name != "stats":
            out[name] = value
    out["source"] = source.astype(header["source"].dtype).tobytes()
    out["seq"] = header["seq"] + lo
    return out


def read_snapshot(path: str | os.PathLike, limits: WireLimits) -> BufferSnapshot[SyntheticSample]:
    """The snapshot :func:`write_snapshot` wrote to ``path``, each header checked against the
    receiver's ``limits``. Raises ValueError for any other file (damaged, foreign, hostile)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            snap = _parse(data, limits)
        snap.check()
        return snap
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; none may stop a resume
        raise ValueError(f"{path} is not a buffer snapshot ({type(err).__name__}: {err})") from None


def _parse(data: Any, limits: WireLimits) -> BufferSnapshot[SyntheticSample]:
    meta = msgpack.unpackb(data["meta"].tobytes(), raw=False, strict_map_key=True)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"meta is not format {FORMAT}")
    pixels = data["pixels"]
    if pixels.dtype != np.uint8 or pixels.ndim != 1:
        raise ValueError("pixels must be flat uint8")
    seqs: list[SampleBatch] = []
    index: list[int] = []
    offset = 0
    for message in meta["messages"]:
        header = decode_header(message["header"], limits)
        k = len(header["nbytes"])
        h, w, c = header["shape"]
        if offset + k * h * w * c > len(pixels):
            raise ValueError("pixels end before the last image")
        images = pixels[offset:offset + k * h * w * c].reshape(k, h, w, c)
        images.flags.writeable = False
        offset += k * h * w * c
        seqs += [SampleBatch(header, images, float(message["received_at"]))] * k
        index += range(k)
    if offset != len(pixels):
        raise ValueError(f"{len(pixels) - offset} pixel bytes belong to no image")
    rng = meta["rng"]
    return BufferSnapshot(seqs, np.asarray(index, np.int64), data["uses"], data["inserted_step"], data["age_s"],
                          meta["counters"], data["reuse_hist"], meta["step"],
                          None if rng is None else (rng[0], tuple(data["rng"].tolist()), rng[1]))
