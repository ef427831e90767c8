"""Real-data sources: built-in shapes, webdataset shards and CSV files, as a torchdata node.

`RealSourceNode` yields *undecoded* `RealRecord`s from one rank's partition, epoch
after epoch, each epoch reshuffled from (seed, epoch). Its state is exactly
(epoch, position): `position` counts items of this rank's epoch order consumed so
far (skipped ones included), so a node reset to a saved state yields exactly what
an uninterrupted node would have yielded next.

Why a custom `BaseNode` rather than `IterableWrapper` over a webdataset pipeline:
built-in and CSV data are random access, so a resume jumps straight to `position`
(O(1)) instead of re-iterating; and the partitioning rules (shards or samples per
rank, set by an explicit rank/world size so producers that are not in the trainers'
process group can use it too) are not those of `webdataset.split_by_node`.
Tar reading, sample grouping and the shuffle buffer are webdataset's own.

Decoding is separate (`decode_record`), so a loader can run it in a parallel mapper;
a corrupt image there gives None, is counted and logged, and never raises.
`decoded_samples` is that graph for one rank (the producer's real data; `iter_real_samples`
runs it inline).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import glob
import logging
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image, ImageOps
from torchdata.nodes import BaseNode, ParallelMapper

from .domains import BUILTIN_DOMAINS, SOURCE_DOMAIN
from .records import RealRecord, RealSample
from .shapes import render_sample
from ..validation import require_at_least

logger = logging.getLogger(__name__)

DATA_KINDS = ("builtin", "webdataset", "csv", "imagefolder")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
COUNTER_NAMES = ("data/corrupt_images", "data/missing_fields", "data/unreadable_files",
                 "data/corrupt_shards", "data/bad_metadata")


@dataclass
class RealDataConfig:
    """Where real image-caption pairs come from.

    kind: "builtin" (procedural shapes), "webdataset" (tar shards, img2dataset layout),
      "csv" (columns path,caption; relative paths against the CSV's folder) or
      "imagefolder" (a folder tree of images, each captioned by the .txt file of its name).
    path: shards as a brace pattern ("data/{00000..00009}.tar"), a list of shards or
      a directory of *.tar; the CSV file; or the image folder. Unused for builtin.
    domain: built-in domain to render: the trainer's real data is the source, "flat";
      "world" is the generator's wider corpus (every world style, see `data.domains`).
    resolution: images are rendered at, or resized and center-cropped to, this size.
    seed: fixes built-in content and every epoch's shuffle order.
    length: built-in epoch size (samples over all ranks).
    shuffle: reshuffle each epoch; shuffle_buffer: webdataset in-stream buffer size.
    epochs: stop after this many epochs (None: loop forever).
    """

    kind: str = "builtin"
    path: Any = None
    domain: str = SOURCE_DOMAIN
    resolution: int = 32
    seed: int = 0
    length: int = 10_000
    shuffle: bool = True
    shuffle_buffer: int = 256
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"kind must be one of {list(DATA_KINDS)}, got {self.kind!r}")
        if self.domain not in BUILTIN_DOMAINS:
            raise ValueError(f"domain must be one of {list(BUILTIN_DOMAINS)}, got {self.domain!r}")
        require_at_least(self, 8, "resolution")
        require_at_least(self, 0, "seed")
        require_at_least(self, 1, "length")
        require_at_least(self, 1, "shuffle_buffer")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if self.kind in ("webdataset", "csv", "imagefolder"):
            if self.path is None or (isinstance(self.path, str) and not self.path.strip()):
                raise ValueError(f"path is required for kind={self.kind!r}")
            if not isinstance(self.path, str):
                self.path = [str(p) for p in self.path]  # list / tuple / OmegaConf ListConfig
                if not self.path:
                    raise ValueError("path must not be an empty list")
            if self.kind in ("csv", "imagefolder") and not isinstance(self.path, str):
                raise ValueError(f"path must be one {'CSV file' if self.kind == 'csv' else 'folder'} "
                                 f"for kind={self.kind!r}, got {self.path!r}")


class DataCounters:
    """Thread-safe named counts of skipped data, for logging (`snapshot()` -> metrics dict)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter({name: 0 for name in COUNTER_NAMES})

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: float(v) for k, v in self._counts.items()}

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]


# --------------------------------------------------------------------------- decoding

def _fit(image: Image.Image, resolution: int | None) -> Image.Image:
    """Resize the shorter side to `resolution` and center-crop to a square."""
    if resolution is None or image.size == (resolution, resolution):
        return image
    return ImageOps.fit(image, (resolution, resolution), Image.BICUBIC)


def decode_record(rec: RealRecord, resolution: int | None = None,
                  counters: DataCounters | None = None) -> RealSample | None:
    """Decode `rec` to an RGB uint8 RealSample (resized to `resolution` if given).

    Returns None, logs a warning naming the key and counts `data/corrupt_images` for
    an image that cannot be decoded. PIL raises many exception types on bad bytes
    (OSError, SyntaxError, ValueError, struct.error, DecompressionBombError), hence
    the broad except.
    """
    try:
        if isinstance(rec.image, np.ndarray):
            arr = rec.image
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"expected uint8 HxWx3, got {arr.dtype} {arr.shape}")
            image = Image.fromarray(arr) if resolution is not None and arr.shape[:2] != (resolution,) * 2 else None
            out = arr if image is None else np.asarray(_fit(image, resolution))
        else:
            with Image.open(io.BytesIO(rec.image)) as im:
                out = np.asarray(_fit(im.convert("RGB"), resolution))
    except Exception as err:  # noqa: BLE001 - see docstring
        logger.warning("skipping corrupt image %s: %s", rec.key, err)
        if counters is not None:
            counters.inc("data/corrupt_images")
        return None
    return RealSample(key=rec.key, image=np.ascontiguousarray(out, dtype=np.uint8), caption=rec.caption,
                      meta=dict(rec.meta))


# --------------------------------------------------------------------------- readers
# A reader gives, for one epoch, this rank's items from a start position on; an item
# is a RealRecord or None (consumed but skipped, already counted).

class _BuiltinReader:
    def __init__(self, cfg: RealDataConfig, rank: int, world_size: int, counters: DataCounters):
        if cfg.length < world_size:
            raise ValueError(f"length ({cfg.length}) must be >= world_size ({world_size})")
        self.cfg, self.rank = cfg, rank
        self.indices = np.arange(rank, cfg.length, world_size)

    def items(self, epoch: int, start: int) -> Iterator[RealRecord | None]:
        order = self.indices
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch, self.rank]).permutation(order)
        for index in order[start:]:
            s = render_sample(int(index), self.cfg.domain, self.cfg.resolution, self.cfg.seed)
            yield RealRecord(s.key, s.image, s.caption, s.meta)


class _CsvReader:
    def __init__(self, cfg: RealDataConfig, rank: int, world_size: int, counters: DataCounters):
        csv_path = Path(cfg.path)
        if not csv_path.is_file():
            raise ValueError(f"path: CSV file not found: {csv_path}")
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"path: CSV {csv_path} lacks column(s) {sorted(missing)}; header must be path,caption")
            rows = [(i, row["path"], row["caption"]) for i, row in enumerate(reader)]
        self.rows = rows[rank::world_size]
        if not self.rows:
            raise ValueError(f"path: CSV {csv_path} has {len(rows)} rows, none for rank {rank} of {world_size}")
        self.root, self.cfg, self.rank, self.counters = csv_path.parent, cfg, rank, counters

    def _load(self, row: int, path: str | None, caption: str | None) -> RealRecord | None:
        path, caption = (path or "").strip(), (caption or "").strip()
        if not path or not caption:
            logger.warning("skipping %s row %d (%s): empty path or caption", self.cfg.kind, row, path)
            self.counters.inc("data/missing_fields")
            return None
        try:
            data = (self.root / path).read_bytes()
        except OSError as err:
            logger.warning("skipping %s row %d: cannot read %s: %s", self.cfg.kind, row, path, err)
            self.counters.inc("data/unreadable_files")
            return None
        return RealRecord(key=path, image=data, caption=caption, meta={"path": path, "row": row})

    def items(self, epoch: int, start: int) -> Iterator[RealRecord | None]:
        order = range(len(self.rows))
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch, self.rank]).permutation(len(self.rows))
        for j in order[start:]:
            yield self._load(*self.rows[j])


class _ImageFolderReader(_CsvReader):
    """Every image under ``path`` (any depth, sorted), captioned by ``<name>.txt`` beside it;
    an image without a readable, non-empty caption is skipped and counted."""

    def __init__(self, cfg: RealDataConfig, rank: int, world_size: int, counters: DataCounters):
        root = Path(cfg.path)
        if not root.is_dir():
            raise ValueError(f"path: image folder not found: {root}")
        images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        self.rows = [(i, str(p.relative_to(root)), None) for i, p in enumerate(images)][rank::world_size]
        if not self.rows:
            raise ValueError(f"path: image folder {root} holds {len(images)} images "
                             f"({'/'.join(IMAGE_EXTENSIONS)}), none for rank {rank} of {world_size}")
        self.root, self.cfg, self.rank, self.counters = root, cfg, rank, counters

    def _load(self, row: int, path: str | None, caption: str | None) -> RealRecord | None:
        try:
            caption = (self.root / path).with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            caption = ""
        return super()._load(row, path, caption)


def resolve_shards(path: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern, a glob (``/data/*.tar``), a list of patterns or a
    directory of *.tar. Local shards must exist; URLs and ``pipe:`` commands are taken as given."""
    patterns = [path] if isinstance(path, str) else list(path)
    shards: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            shards.extend(sorted(str(p) for p in Path(pattern).glob("*.tar")))
            continue
        for url in braceexpand.braceexpand(pattern):
            remote = "://" in url or url.startswith("pipe:")
            if not remote and glob.has_magic(url):
                matched = sorted(glob.glob(os.path.expanduser(url)))
                if not matched:
                    raise ValueError(f"path: no shard matches {url!r}")
                shards.extend(matched)
            else:
                shards.append(url)
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not os.path.isfile(s)]
    if missing:
        raise ValueError(f"path: {len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise ValueError(f"path: no shards found in {path!r}")
    return shards


class _WebDatasetReader:
    """Shards split across ranks when there are at least as many shards as ranks;
    otherwise every rank reads all shards (in the same order) and keeps sample i when
    i % world_size == rank. Within an epoch a seeded webdataset shuffle buffer mixes
    samples; a resume replays the epoch's stream to `start` (reading, not decoding)."""

    def __init__(self, cfg: RealDataConfig, rank: int, world_size: int, counters: DataCounters):
        shards = resolve_shards(cfg.path)
        self.split_shards = len(shards) >= world_size
        self.shards = shards[rank::world_size] if self.split_shards else shards
        self.cfg, self.rank, self.world_size, self.counters = cfg, rank, world_size, counters

    def _on_shard_error(self, exn: Exception) -> bool:
        logger.warning("skipping unreadable part of a shard: %r", exn)
        self.counters.inc("data/corrupt_shards")
        return True

    def _raw(self, epoch: int) -> Iterator[dict]:
        shards = list(self.shards)
        if self.cfg.shuffle:
            # rank-independent order when ranks split samples, so their streams agree
            tag = [self.cfg.seed, epoch, self.rank] if self.split_shards else [self.cfg.seed, epoch]
            shards = [shards[i] for i in np.random.default_rng(tag).permutation(len(shards))]
        stream = wds.tariterators.tarfile_samples([{"url": u} for u in shards], handler=self._on_shard_error)
        if not self.split_shards:
            stream = itertools.islice(stream, self.rank, None, self.world_size)
        if self.cfg.shuffle and self.cfg.shuffle_buffer > 1:
            rng = random.Random(f"{self.cfg.seed}-{epoch}-{self.rank}")
            stream = wds.filters.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(
                iter(stream))
        return stream

    def _record(self, sample: dict) -> RealRecord | None:
        key = sample.get("__key__", "?")
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        caption = sample.get("txt", b"")
        caption = caption.decode("utf-8", errors="replace").strip() if isinstance(caption, bytes) else ""
        if image is None or not caption:
            logger.warning("skipping %s in %s: missing %s", key, sample.get("__url__"),
                           "image" if image is None else "caption")
            self.counters.inc("data/missing_fields")
            return None
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                loaded = json.loads(sample["json"])
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                meta.update(loaded)
            except ValueError as err:
                logger.warning("ignoring bad metadata of %s: %s", key, err)
                self.counters.inc("data/bad_metadata")
        meta["shard"] = sample.get("__url__")
        return RealRecord(key=key, image=image, caption=caption, meta=meta)

    def items(self, epoch: int, start: int) -> Iterator[RealRecord | None]:
        for sample in itertools.islice(self._raw(epoch), start, None):
            yield self._record(sample)


_READERS = {"builtin": _BuiltinReader, "csv": _CsvReader, "webdataset": _WebDatasetReader,
            "imagefolder": _ImageFolderReader}


# --------------------------------------------------------------------------- the node

class RealSourceNode(BaseNode[RealRecord]):
    """Undecoded records of rank `rank` of `world_size`, with exact resumable state.

    Partitions: built-in index i and CSV row i go to rank i % world_size; webdataset
    shards are split across ranks (or samples, when there are fewer shards than ranks).
    Skipped records (missing fields, unreadable files) are counted in `counters`.
    """

    def __init__(self, cfg: RealDataConfig, rank: int = 0, world_size: int = 1,
                 counters: DataCounters | None = None):
        super().__init__()
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.counters = counters if counters is not None else DataCounters()
        self._reader = _READERS[cfg.kind](cfg, rank, world_size, self.counters)
        self._items: Iterator[RealRecord | None] | None = None
        self._epoch = self._position = 0

    def _identity(self) -> dict[str, Any]:
        return {"kind": self.cfg.kind, "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size}

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        epoch = position = 0
        if initial_state is not None:
            saved = {k: initial_state.get(k) for k in self._identity()}
            if saved != self._identity():
                raise ValueError(f"initial_state is for {saved}, this node is {self._identity()}")
            epoch, position = int(initial_state["epoch"]), int(initial_state["position"])
        self._start(epoch, position)

    def _start(self, epoch: int, position: int) -> None:
        self._epoch, self._position, self._started_at, self._valid_in_epoch = epoch, position, position, 0
        self._items = self._reader.items(epoch, position)

    def next(self) -> RealRecord:
        while True:
            if self.cfg.epochs is not None and self._epoch >= self.cfg.epochs:
                raise StopIteration
            item = next(self._items, StopIteration)
            if item is StopIteration:
                if self._started_at == 0 and self._valid_in_epoch == 0:
                    # looping again would spin forever on an empty or wholly unusable partition
                    raise ValueError(f"rank {self.rank} of {self.world_size} found no usable record in a whole "
                                     f"epoch of {self.cfg.kind} source {self.cfg.path!r} "
                                     f"({self._position} skipped; see data/* counters)")
                self._start(self._epoch + 1, 0)
                continue
            self._position += 1
            if item is not None:
                self._valid_in_epoch += 1
                return item

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, **self._identity()}


class _WithEpoch(BaseNode):
    """``(epoch, record)`` pairs of a RealSourceNode, so that a node after a parallel decoder
    still knows which epoch each decoded sample belongs to."""

    def __init__(self, source: RealSourceNode):
        super().__init__()
        self.source = source

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)

    def next(self) -> tuple[int, RealRecord]:
        record = next(self.source)
        return self.source.get_state()["epoch"], record

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}


class _Decoded(BaseNode[RealSample]):
    """Decoded samples after the decoder: skips the corrupt ones (``None``, already counted)
    and raises ValueError when a whole epoch decoded to nothing, instead of looping forever."""

    def __init__(self, source: BaseNode, cfg: RealDataConfig, rank: int, world_size: int):
        super().__init__()
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self._epoch = self._decoded = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)
        self._epoch, self._decoded = (0, 0) if initial_state is None else (initial_state["epoch"],
                                                                           initial_state["decoded"])

    def next(self) -> RealSample:
        while True:
            epoch, sample = next(self.source)
            if epoch != self._epoch:
                if self._decoded == 0:
                    raise ValueError(f"no image of a whole epoch of {self.cfg.kind} source {self.cfg.path!r} could "
                                     f"be decoded for rank {self.rank} of {self.world_size} (see data/* counters)")
                self._epoch, self._decoded = epoch, 0
            if sample is not None:
                self._decoded += 1
                return sample

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "epoch": self._epoch, "decoded": self._decoded}


def decoded_samples(cfg: RealDataConfig, rank: int = 0, world_size: int = 1, counters: DataCounters | None = None,
                    num_workers: int = 0) -> BaseNode[RealSample]:
    """Decoded samples of this rank's partition, at ``cfg.resolution``, as a torchdata.nodes graph::

        RealSourceNode -> ParallelMapper(decode_record, num_workers threads, in order) -> skip corrupt

    ``num_workers=0`` decodes inline, in the caller's thread. Corrupt images are skipped,
    counted and logged; a whole epoch that decodes to nothing raises ValueError.
    """
    node = RealSourceNode(cfg, rank, world_size, counters)
    counters = node.counters

    def decode(item: tuple[int, RealRecord]) -> tuple[int, RealSample | None]:
        return item[0], decode_record(item[1], cfg.resolution, counters)

    decoded = ParallelMapper(_WithEpoch(node), decode, num_workers=num_workers, in_order=True, method="thread")
    return _Decoded(decoded, cfg, rank, world_size)


def iter_real_samples(cfg: RealDataConfig, rank: int = 0, world_size: int = 1,
                      counters: DataCounters | None = None) -> Iterator[RealSample]:
    """Decoded samples of this rank's partition, decoded in the caller's thread
    (:func:`decoded_samples` with no workers); corrupt images are skipped, counted and logged.

    Raises ValueError when a whole epoch decodes to nothing (instead of looping forever).
    """
    return decoded_samples(cfg, rank, world_size, counters)
