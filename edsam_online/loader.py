"""The trainer's data loader: real data and the replay buffer, mixed for Eq. 11.

Graph (torchdata.nodes)::

    RealSourceNode ─> ParallelMapper(decode, preprocess, tokenize) ─> DropInvalid ─> Batcher(real_batch) ─┐
                                                                                        ZipParts(slot) ─┴─> Prefetcher
    slot source ─> ParallelMapper(...) ─> DropInvalid ──────────────────────────────────────┘

Every batch is a :class:`MixedBatch` whose real part and slot (the extra batch of Eq.
11's second term) stay separate tensors, so the loss can form the two terms. The slot
source is the method's (:mod:`edsam_online.methods`): ``extra="stream"`` draws synthetic
samples from the replay buffer (:class:`SyntheticSlotNode`); ``extra="real"`` (the
``real2x`` control) reads a second real stream, and :class:`ZipParts` keeps its keys
disjoint from the step's real batch and from each other.

**What a starved step does** (docs/design.md, 'Replay buffer'):

* Each step's synthetic slot has a fixed size ``extra_batch``. Its items come
  from the local buffer with a bounded wait shared by the whole slot
  (``extra_wait_s`` per batch, not per item, so a dry buffer costs at most that
  much per step). A slot item the buffer cannot serve is filled with a *real*
  record from a separate fallback stream and flagged
  ``extra_genuine=False``. Fixed shapes matter: each loss term all-gathers
  its batch across ranks, which needs equal sizes on every rank.
* The trainer sums the flags over all ranks each step. When the global slot
  holds no synthetic sample at all (warm-up before ``min_size_to_sample``, every
  producer down) the step trains on the real term alone and is
  counted in ``train/steps_without_extra``. A partly starved step keeps the
  synthetic term over its slot, fallback pairs included (counted per sample in
  ``train/extra_fallback_samples``; ``train/extra_share_actual`` reports the true
  synthetic share). The buffer itself counts ``buffer/starved``.
* The fallback stream is a second ``RealSourceNode`` over the same data and
  partition, started at a far-away epoch (another shuffle of the same set), so
  the main real stream never depends on buffer timing: a resumed run sees
  exactly the real keys an uninterrupted one would. ``real2x``'s stream is built the
  same way, from another far-away epoch.
* ``distinct_sources`` (``buffer.distinct_sources``): a slot takes at most one sample
  per source key. The M samples of one source image share its caption, so two of them in
  one InfoNCE batch are false negatives of each other.

Synthetic samples are ephemeral: a checkpoint keeps the real and fallback
stream positions and the slot counters, not buffer contents.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchdata.nodes import BaseNode, Batcher, Loader, ParallelMapper, Prefetcher

from edsam_online.buffer import ReplayBuffer
from edsam_online.data import DataCounters, RealDataConfig, RealRecord, RealSample, RealSourceNode, decode_record
from edsam_online.runtime import RuntimeConfig
from edsam_online.validation import require_at_least
from edsam_online.wire import SyntheticSample

FALLBACK_EPOCH = 1_000_000  # the fallback stream starts here: same data, an unrelated shuffle
EXTRA_EPOCH = 2_000_000  # real2x's second stream starts here
EXTRAS = ("stream", "real", "shards")
MIX_MODES = ("add", "replace")


@dataclass
class MixConfig:
    """How a step combines its real batch with the extra batch of Eq. 11's second term (Hydra key ``mix``).

    The extra batch is the method's (:mod:`edsam_online.methods`): generated samples for
    ``edsam``, ``random`` and ``identity``, a second real batch for ``real2x``, augmented
    views for ``masking``, ``ada`` and ``advstyle``. ``extra_share`` sets its size relative to
    ``trainer.batch_size``. ``mix_mode="add"`` is Eq. 11 as written: ``round(extra_share *
    batch_size)`` extra pairs are *added* to the ``batch_size`` real ones. ``mix_mode="replace"``
    is the compute-matched ablation: the extra part replaces that many real pairs, so a step
    sees ``batch_size`` images in all (the second term's weight is ``loss.extra_weight``).
    ``extra_wait_s`` is the bounded wait per step for a synthetic slot (the module docstring
    says what a starved step does).
    """

    extra_share: float = 1.0
    mix_mode: str = "add"
    extra_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.extra_share <= 1.0:
            raise ValueError(f"extra_share must be in [0, 1], got {self.extra_share}")
        if self.mix_mode not in MIX_MODES:
            raise ValueError(f"mix_mode must be one of {MIX_MODES}, got {self.mix_mode!r}")
        require_at_least(self, 0, "extra_wait_s")

    def extra_batch_size(self, batch_size: int) -> int:
        """Extra-batch pairs per rank per step."""
        return round(self.extra_share * batch_size)

    def real_batch_size(self, batch_size: int) -> int:
        """Real samples per rank per step (fewer than ``batch_size`` only in ``replace`` mode)."""
        return batch_size - (self.extra_batch_size(batch_size) if self.mix_mode == "replace" else 0)


class Origin(NamedTuple):
    """Where a generated sample can be reported back to (:mod:`edsam_online.feedback`): its
    producer's ``session``, its own ``seq`` number and the producer's ``feedback`` endpoint."""

    session: int
    seq: int
    feedback: str


class Drawn(NamedTuple):
    """A sample the replay buffer served, with the trainer step at which it was inserted."""

    sample: SyntheticSample
    inserted_step: int


@dataclass
class Example:
    """One preprocessed pair, with its provenance (``extra``: a genuine extra-batch pair, i.e.
    a generated sample or ``real2x``'s second real pair, not a real-batch pair nor a starved
    slot's fallback; ``producer``: the producer id of a generated sample; ``inserted_step``:
    the trainer step at which the buffer took it in; ``origin``: for a sample whose producer
    takes feedback, where to report it; ``source_thumb``: the thumbnail of the image a generated
    sample came from, where its producer sent one)."""

    image: torch.Tensor
    tokens: torch.Tensor
    key: str
    extra: bool
    alpha: float = float("nan")
    score: float = float("nan")  # the producer's fidelity score, NaN when it sent none
    caption: str = ""
    producer: str | None = None
    inserted_step: int | None = None
    origin: Origin | None = None
    source_thumb: np.ndarray | None = None


@dataclass
class MixedBatch:
    """One step's data on one rank. ``extra_*`` has ``extra_batch`` rows (possibly 0).

    The caption strings and the slot rows' provenance (``extra_producers``: producer id or
    None; ``extra_inserted_steps``: the trainer step at which the buffer took the row in, or
    None for rows that did not come from it; ``extra_source_thumbs``: the thumbnail of each
    row's source image, or None) are plain lists of references the loader already holds,
    read only when samples are logged (``logging.sample_every``). They are empty in a batch
    built without them; then nothing is known about those rows."""

    real_images: torch.Tensor
    real_texts: torch.Tensor
    real_keys: list[str]
    extra_images: torch.Tensor
    extra_texts: torch.Tensor
    extra_keys: list[str]
    extra_genuine: torch.Tensor  # bool [extra_batch]; True = an extra-batch pair, False = real fallback
    extra_alpha: torch.Tensor  # float [extra_batch]; NaN for fallback rows
    extra_score: torch.Tensor | None = None  # float [extra_batch]; NaN where a row has no score (None: no row has)
    real_captions: list[str] = field(default_factory=list)
    extra_captions: list[str] = field(default_factory=list)
    extra_producers: list[str | None] = field(default_factory=list)
    extra_inserted_steps: list[int | None] = field(default_factory=list)
    extra_origins: list[Origin | None] = field(default_factory=list)
    extra_source_thumbs: list[np.ndarray | None] = field(default_factory=list)

    @property
    def num_genuine(self) -> int:
        return int(self.extra_genuine.sum())


class FromEpoch(BaseNode):
    """A real stream that, started fresh, begins at ``epoch`` (a shuffle of the same data
    unrelated to the main stream's) and never runs dry; resumed, it continues its state."""

    def __init__(self, source: RealSourceNode, epoch: int):
        super().__init__()
        self.source, self.epoch = source, epoch

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:
            self.source.reset({**self.source.get_state(), "epoch": self.epoch, "position": 0})
        else:
            self.source.reset(initial_state["source"])

    def next(self) -> RealRecord:
        return next(self.source)

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}


class SyntheticSlotNode(BaseNode):
    """Synthetic slot items from a live ``ReplayBuffer``, real fallback when it cannot serve.

    A custom node, not ``IterableWrapper``: ``IterableWrapper`` restores state by
    re-iterating from the start, which a live stream cannot do. State = the fallback
    stream's position, the counters and the current slot's progress. With
    ``distinct_sources`` a slot takes at most one sample per source key (the buffer
    skips the others). Yields :class:`Drawn` (a buffer item and its insert step) or
    ``RealRecord`` items.
    """

    def __init__(self, buffer: ReplayBuffer, fallback: BaseNode, slot_size: int, wait_s: float,
                 distinct_sources: bool = False):
        super().__init__()
        if slot_size < 1:
            raise ValueError(f"slot_size must be >= 1, got {slot_size}")
        self.buffer = buffer
        self.fallback = fallback
        self.slot_size = slot_size
        self.wait_s = wait_s
        self.distinct_sources = distinct_sources
        self._pos = 0
        self._deadline = 0.0
        self._keys: set[str] = set()  # source keys in the current slot (distinct_sources)
        self.served = 0
        self.fell_back = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.fallback.reset(initial_state["fallback"] if initial_state is not None else None)
        if initial_state is None:
            self.served = self.fell_back = self._pos = 0
            self._keys = set()
        else:
            self.served, self.fell_back = initial_state["served"], initial_state["fell_back"]
            self._pos, self._keys = initial_state["pos"], set(initial_state.get("keys", ()))

    def next(self) -> Drawn | RealRecord:
        if self._pos == 0:
            self._deadline = time.monotonic() + self.wait_s
            self._keys = set()
        self._pos = (self._pos + 1) % self.slot_size
        exclude = self._keys if self.distinct_sources else None
        drawn = self.buffer.sample_with_step(max(0.0, self._deadline - time.monotonic()), exclude=exclude)
        if drawn is not None:
            self.served += 1
            if exclude is not None:
                self._keys.add(drawn[0].source_key)
            return Drawn(*drawn)
        self.fell_back += 1
        return next(self.fallback)

    def get_state(self) -> dict[str, Any]:
        return {
            "fallback": self.fallback.state_dict(),
            "served": self.served,
            "fell_back": self.fell_back,
            "pos": self._pos,
            "keys": sorted(self._keys),
        }


class DropInvalid(BaseNode):
    """Skips ``None`` items (undecodable images), counting them; keeps batch shapes fixed."""

    def __init__(self, source: BaseNode, counters: DataCounters, name: str):
        super().__init__()
        self.source, self.counters, self.name = source, counters, name

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state["source"] if initial_state is not None else None)

    def next(self):
        while True:
            item = next(self.source)
            if item is not None:
                return item
            self.counters.inc(self.name)

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}


class ZipParts(BaseNode):
    """One real batch and a slot of ``slot_size`` items per step, collated into a MixedBatch.

    ``distinct``: slot items whose key is in the step's real batch or already in the slot
    are skipped (and counted as ``data/extra_duplicates_skipped``), so a step never holds
    one pair twice (``real2x``: its stream reshuffles the same data)."""

    def __init__(self, real: BaseNode, slot: BaseNode | None, slot_size: int,
                 collate: Callable[[list, list], MixedBatch], distinct: bool = False,
                 counters: DataCounters | None = None):
        super().__init__()
        self.real, self.slot, self.slot_size, self.collate = real, slot, slot_size, collate
        self.distinct, self.counters = distinct, counters

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.real.reset(initial_state["real"] if initial_state is not None else None)
        if self.slot is not None:
            self.slot.reset(initial_state["slot"] if initial_state is not None else None)

    def next(self) -> MixedBatch:
        real = next(self.real)
        slot: list[Example] = []
        taken = {e.key for e in real} if self.distinct else None
        while self.slot is not None and len(slot) < self.slot_size:
            item = next(self.slot)
            if taken is not None:
                if item.key in taken:
                    if self.counters is not None:
                        self.counters.inc("data/extra_duplicates_skipped")
                    continue
                taken.add(item.key)
            slot.append(item)
        return self.collate(real, slot)

    def get_state(self) -> dict[str, Any]:
        return {"real": self.real.state_dict(), "slot": self.slot.state_dict() if self.slot is not None else None}


class Preprocess:
    """Decode (real records), open_clip image transform, tokenize. Returns None for a corrupt image.

    ``extra``: the real records are the method's own extra-batch pairs (``real2x``'s second
    stream), not the fallback of a starved synthetic slot. Samples drawn from the replay
    buffer are always genuine extra pairs and carry their producer's provenance."""

    def __init__(self, transform: Callable, tokenizer: Callable, resolution: int | None, counters: DataCounters,
                 extra: bool = False):
        self.transform, self.tokenizer = transform, tokenizer
        self.resolution, self.counters = resolution, counters
        self.extra = extra

    def __call__(self, item: RealRecord | Drawn) -> Example | None:
        if isinstance(item, Drawn):
            sample, inserted_step = item
            score = float("nan") if sample.score is None else sample.score
            header = sample.batch.header
            example = self.example(sample.image, sample.caption, sample.source_key, True, sample.alpha, score,
                                   header["producer_id"], inserted_step)
            if "feedback" in header:
                example.origin = Origin(header["session"], header["seq"] + sample.index, header["feedback"])
            example.source_thumb = sample.source_thumb
            return example
        decoded = decode_record(item, self.resolution, self.counters)
        if decoded is None:
            return None
        return self.record_example(decoded)

    def record_example(self, sample: RealSample) -> Example:
        return self.example(sample.image, sample.caption, sample.key, self.extra)

    def example(self, array: np.ndarray, caption: str, key: str, extra: bool, alpha: float = float("nan"),
                score: float = float("nan"), producer: str | None = None,
                inserted_step: int | None = None) -> Example:
        image = self.transform(Image.fromarray(np.asarray(array)))
        return Example(image, self.tokenizer([caption])[0], key, extra, alpha, score, caption, producer,
                       inserted_step)


class ShardPreprocess(Preprocess):
    """Generated samples a producer wrote to offline shards (``extra="shards"``): genuine
    extra pairs whose provenance (source key, alpha, score, producer id: the fields of
    :func:`edsam_online.wire.provenance`) is read back from each sample's JSON. A field
    missing or out of range there is NaN (or None), never an error: a shard is not trusted."""

    def record_example(self, sample: RealSample) -> Example:
        meta = sample.meta
        key = str(meta["source_key"]) if "source_key" in meta else sample.key
        producer = meta["producer_id"] if isinstance(meta.get("producer_id"), str) else None
        return self.example(sample.image, sample.caption, key, True, _meta_number(meta, "alpha"),
                            _meta_number(meta, "score", 0.0, 1.0), producer)


def _meta_number(meta: dict[str, Any], name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """An offline sample's provenance number, NaN where its JSON lacks it or holds no finite
    number in [lo, hi] (a shard's JSON is not trusted)."""
    value = meta.get(name)
    if type(value) not in (int, float) or not (math.isfinite(value) and lo <= value <= hi):
        return float("nan")
    return float(value)


def collate(real: list[Example], slot: list[Example]) -> MixedBatch:
    def stack(items: list[Example], like: Example) -> tuple[torch.Tensor, torch.Tensor]:
        if items:
            return torch.stack([e.image for e in items]), torch.stack([e.tokens for e in items])
        return like.image.new_empty((0, *like.image.shape)), like.tokens.new_empty((0, *like.tokens.shape))

    real_images, real_texts = stack(real, real[0])
    extra_images, extra_texts = stack(slot, real[0])
    return MixedBatch(
        real_images=real_images,
        real_texts=real_texts,
        real_keys=[e.key for e in real],
        extra_images=extra_images,
        extra_texts=extra_texts,
        extra_keys=[e.key for e in slot],
        extra_genuine=torch.tensor([e.extra for e in slot], dtype=torch.bool),
        extra_alpha=torch.tensor([e.alpha for e in slot], dtype=torch.float32),
        extra_score=torch.tensor([e.score for e in slot], dtype=torch.float32),
        real_captions=[e.caption for e in real],
        extra_captions=[e.caption for e in slot],
        extra_producers=[e.producer for e in slot],
        extra_inserted_steps=[e.inserted_step for e in slot],
        extra_origins=[e.origin for e in slot],
        extra_source_thumbs=[e.source_thumb for e in slot],
    )


class MixedLoader:
    """Stateful iterable of :class:`MixedBatch` for one trainer rank.

    ``extra_batch = 0`` gives real-only batches with an empty slot. ``mix`` gives the slot's
    bounded wait (``extra_wait_s``), ``runtime`` the decoding threads and prefetched batches
    (``num_workers``, ``prefetch``); None takes their defaults. ``extra`` is where the
    slot's items come from: ``"stream"`` (the replay ``buffer``, with a real fallback;
    ``distinct_sources``: at most one sample per source key in a slot) or ``"real"`` (a
    second real stream, disjoint within each step) or ``"shards"`` (generated samples a
    producer wrote to ``shards``, read as a webdataset source). ``state_dict()`` /
    ``load_state_dict()`` (before iterating) make a resumed run continue its real-data
    stream exactly.
    """

    def __init__(
        self,
        data_cfg: RealDataConfig,
        transform: Callable,
        tokenizer: Callable,
        real_batch: int,
        extra_batch: int = 0,
        buffer: ReplayBuffer | None = None,
        *,
        mix: MixConfig | None = None,
        runtime: RuntimeConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        extra: str = "stream",
        distinct_sources: bool = False,
        shards: str | list[str] = "",
    ):
        if real_batch < 1:
            raise ValueError(f"real_batch must be >= 1, got {real_batch}")
        if extra_batch < 0:
            raise ValueError(f"extra_batch must be >= 0, got {extra_batch}")
        if extra not in EXTRAS:
            raise ValueError(f"extra must be one of {EXTRAS}, got {extra!r}")
        if extra_batch > 0 and extra == "stream" and buffer is None:
            raise ValueError("buffer is required when extra_batch > 0 and extra='stream'")
        self.counters = DataCounters()
        mix, runtime = mix or MixConfig(), runtime or RuntimeConfig()
        extra_wait_s, num_workers, prefetch = mix.extra_wait_s, runtime.num_workers, runtime.prefetch

        def mapped(source: BaseNode, preprocess: Preprocess) -> BaseNode:
            items = ParallelMapper(source, preprocess, num_workers=num_workers, in_order=True, method="thread")
            return DropInvalid(items, self.counters, "data/corrupt_skipped")

        def another_stream(epoch: int) -> FromEpoch:  # same data and partition, never runs dry
            return FromEpoch(RealSourceNode(dataclasses.replace(data_cfg, epochs=None), rank, world_size,
                                            self.counters), epoch)

        preprocess = Preprocess(transform, tokenizer, data_cfg.resolution, self.counters)
        real = Batcher(mapped(RealSourceNode(data_cfg, rank, world_size, self.counters), preprocess), real_batch,
                       drop_last=True)
        slot = None
        if extra_batch > 0 and extra == "stream":
            source = SyntheticSlotNode(buffer, another_stream(FALLBACK_EPOCH), extra_batch, extra_wait_s,
                                       distinct_sources)
            slot = mapped(source, preprocess)
        elif extra_batch > 0:
            if extra == "real":
                slot = mapped(another_stream(EXTRA_EPOCH),
                              Preprocess(transform, tokenizer, data_cfg.resolution, self.counters, extra=True))
            else:  # offline shards a producer wrote: a webdataset source of their own
                shard_cfg = RealDataConfig(kind="webdataset", path=shards, resolution=data_cfg.resolution,
                                           seed=data_cfg.seed, shuffle=data_cfg.shuffle,
                                           shuffle_buffer=data_cfg.shuffle_buffer)
                slot = mapped(RealSourceNode(shard_cfg, rank, world_size, self.counters),
                              ShardPreprocess(transform, tokenizer, data_cfg.resolution, self.counters))
        zipped = ZipParts(real, slot, extra_batch, collate, distinct=extra == "real", counters=self.counters)
        root = Prefetcher(zipped, prefetch_factor=prefetch)
        self._loader = Loader(root, restart_on_stop_iteration=False)

    def __iter__(self):
        return iter(self._loader)

    def state_dict(self) -> dict[str, Any]:
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        """Data-side counters (``data/*``; read-ahead included)."""
        return self.counters.snapshot()
