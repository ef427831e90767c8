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

* Each step's synthetic slot has a fixed size ``syn_batch``. Its items come
  from the local buffer with a bounded wait shared by the whole slot
  (``syn_wait_s`` per batch, not per item, so a dry buffer costs at most that
  much per step). A slot item the buffer cannot serve is filled with a *real*
  record from a separate fallback stream and flagged
  ``syn_is_synthetic=False``. Fixed shapes matter: each loss term all-gathers
  its batch across ranks, which needs equal sizes on every rank.
* The trainer sums the flags over all ranks each step. When the global slot
  holds no synthetic sample at all (warm-up before ``min_size_to_sample``, every
  producer down) the step trains on the real term alone and is
  counted in ``train/steps_without_syn``. A partly starved step keeps the
  synthetic term over its slot, fallback pairs included (counted per sample in
  ``train/syn_fallback_samples``; ``train/syn_share_actual`` reports the true
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
from edsam_online.data import DataCounters, RealDataConfig, RealRecord, RealSourceNode, decode_record
from edsam_online.runtime import RuntimeConfig
from edsam_online.validation import require_at_least
from edsam_online.wire import SyntheticSample

FALLBACK_EPOCH = 1_000_000  # the fallback stream starts here: same data, an unrelated shuffle
EXTRA_EPOCH = 2_000_000  # real2x's second stream starts here
EXTRAS = ("stream", "real", "shards")
MIX_MODES = ("add", "replace")


@dataclass
class MixConfig:
    """How a step combines real and synthetic pairs (Hydra key ``mix``).

    ``syn_share`` sets the synthetic batch size relative to ``trainer.batch_size``.
    ``mix_mode="add"`` is Eq. 11 as written: ``round(syn_share * batch_size)`` synthetic
    samples are *added* to the ``batch_size`` real ones. ``mix_mode="replace"`` is the
    compute-matched ablation: the synthetic part replaces that many real samples, so a
    step sees ``batch_size`` images in all (the second term's weight is ``loss.syn_weight``).
    ``syn_wait_s`` is the bounded wait per step for the
    synthetic slot (the module docstring says what a starved step does).
    """

    syn_share: float = 1.0
    mix_mode: str = "add"
    syn_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.syn_share <= 1.0:
            raise ValueError(f"syn_share must be in [0, 1], got {self.syn_share}")
        if self.mix_mode not in MIX_MODES:
            raise ValueError(f"mix_mode must be one of {MIX_MODES}, got {self.mix_mode!r}")
        require_at_least(self, 0, "syn_wait_s")

    def syn_batch_size(self, batch_size: int) -> int:
        """Synthetic samples per rank per step."""
        return round(self.syn_share * batch_size)

    def real_batch_size(self, batch_size: int) -> int:
        """Real samples per rank per step (fewer than ``batch_size`` only in ``replace`` mode)."""
        return batch_size - (self.syn_batch_size(batch_size) if self.mix_mode == "replace" else 0)


class Drawn(NamedTuple):
    """A sample the replay buffer served, with the trainer step at which it was inserted."""

    sample: SyntheticSample
    inserted_step: int


@dataclass
class Example:
    """One preprocessed pair, with its provenance (``producer``: the producer id of a
    generated sample; ``inserted_step``: the trainer step at which the buffer took it in)."""

    image: torch.Tensor
    tokens: torch.Tensor
    key: str
    synthetic: bool
    alpha: float = float("nan")
    score: float = float("nan")  # the producer's fidelity score, NaN when it sent none
    caption: str = ""
    producer: str | None = None
    inserted_step: int | None = None


@dataclass
class MixedBatch:
    """One step's data on one rank. ``syn_*`` has ``syn_batch`` rows (possibly 0).

    The caption strings and the slot rows' provenance (``syn_producers``: producer id or
    None; ``syn_inserted_steps``: the trainer step at which the buffer took the row in, or
    None for rows that did not come from it) are plain lists of references the loader
    already holds, read only when samples are logged (``logging.sample_every``). They are
    empty in a batch built without them; then nothing is known about those rows."""

    real_images: torch.Tensor
    real_texts: torch.Tensor
    real_keys: list[str]
    syn_images: torch.Tensor
    syn_texts: torch.Tensor
    syn_keys: list[str]
    syn_is_synthetic: torch.Tensor  # bool [syn_batch]; True = an extra-batch pair, False = real fallback
    syn_alpha: torch.Tensor  # float [syn_batch]; NaN for fallback rows
    syn_score: torch.Tensor | None = None  # float [syn_batch]; NaN where a row has no score (None: no row has)
    real_captions: list[str] = field(default_factory=list)
    syn_captions: list[str] = field(default_factory=list)
    syn_producers: list[str | None] = field(default_factory=list)
    syn_inserted_steps: list[int | None] = field(default_factory=list)

    @property
    def num_synthetic(self) -> int:
        return int(self.syn_is_synthetic.sum())


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

    ``real_is_extra``: real records are genuine extra-batch pairs (``real2x``), flagged as
    such, rather than the fallback of a starved synthetic slot."""

    def __init__(self, transform: Callable, tokenizer: Callable, resolution: int | None, counters: DataCounters,
                 real_is_extra: bool = False):
        self.transform, self.tokenizer = transform, tokenizer
        self.resolution, self.counters = resolution, counters
        self.real_is_extra = real_is_extra

    def __call__(self, item: RealRecord | SyntheticSample | Drawn) -> Example | None:
        score = float("nan")
        producer = inserted_step = None
        if isinstance(item, Drawn):
            item, inserted_step = item
        if isinstance(item, SyntheticSample):
            array, caption, key, synthetic, alpha = item.image, item.caption, item.source_key, True, item.alpha
            producer = item.batch.header["producer_id"]
            if item.score is not None:
                score = item.score
        else:
            sample = decode_record(item, self.resolution, self.counters)
            if sample is None:
                return None
            array, caption, key, alpha = sample.image, sample.caption, sample.key, float("nan")
            synthetic = self.real_is_extra
            if synthetic and "source_key" in sample.meta:  # an offline sample: its provenance
                key, alpha = str(sample.meta["source_key"]), _meta_number(sample.meta, "alpha")
                score = _meta_number(sample.meta, "score", 0.0, 1.0)
                if isinstance(sample.meta.get("producer_id"), str):
                    producer = sample.meta["producer_id"]
        image = self.transform(Image.fromarray(np.asarray(array)))
        return Example(image, self.tokenizer([caption])[0], key, synthetic, alpha, score, caption, producer,
                       inserted_step)


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
    syn_images, syn_texts = stack(slot, real[0])
    return MixedBatch(
        real_images=real_images,
        real_texts=real_texts,
        real_keys=[e.key for e in real],
        syn_images=syn_images,
        syn_texts=syn_texts,
        syn_keys=[e.key for e in slot],
        syn_is_synthetic=torch.tensor([e.synthetic for e in slot], dtype=torch.bool),
        syn_alpha=torch.tensor([e.alpha for e in slot], dtype=torch.float32),
        syn_score=torch.tensor([e.score for e in slot], dtype=torch.float32),
        real_captions=[e.caption for e in real],
        syn_captions=[e.caption for e in slot],
        syn_producers=[e.producer for e in slot],
        syn_inserted_steps=[e.inserted_step for e in slot],
    )


class MixedLoader:
    """Stateful iterable of :class:`MixedBatch` for one trainer rank.

    ``syn_batch = 0`` gives real-only batches with an empty slot. ``mix`` gives the slot's
    bounded wait (``syn_wait_s``), ``runtime`` the decoding threads and prefetched batches
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
        syn_batch: int = 0,
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
        if syn_batch < 0:
            raise ValueError(f"syn_batch must be >= 0, got {syn_batch}")
        if extra not in EXTRAS:
            raise ValueError(f"extra must be one of {EXTRAS}, got {extra!r}")
        if syn_batch > 0 and extra == "stream" and buffer is None:
            raise ValueError("buffer is required when syn_batch > 0 and extra='stream'")
        self.counters = DataCounters()
        mix, runtime = mix or MixConfig(), runtime or RuntimeConfig()
        syn_wait_s, num_workers, prefetch = mix.syn_wait_s, runtime.num_workers, runtime.prefetch

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
        if syn_batch > 0 and extra == "stream":
            source = SyntheticSlotNode(buffer, another_stream(FALLBACK_EPOCH), syn_batch, syn_wait_s,
                                       distinct_sources)
            slot = mapped(source, preprocess)
        elif syn_batch > 0:
            extra_preprocess = Preprocess(transform, tokenizer, data_cfg.resolution, self.counters, real_is_extra=True)
            if extra == "real":
                source: BaseNode = another_stream(EXTRA_EPOCH)
            else:  # offline shards a producer wrote: a webdataset source of their own
                shard_cfg = RealDataConfig(kind="webdataset", path=shards, resolution=data_cfg.resolution,
                                           seed=data_cfg.seed, shuffle=data_cfg.shuffle,
                                           shuffle_buffer=data_cfg.shuffle_buffer)
                source = RealSourceNode(shard_cfg, rank, world_size, self.counters)
            slot = mapped(source, extra_preprocess)
        zipped = ZipParts(real, slot, syn_batch, collate, distinct=extra == "real", counters=self.counters)
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
