"""A producer rank: real pairs -> ED-SAM sampler -> ZeroMQ PUSH, forever or for N samples.

:class:`Producer` is the library's generation loop; ``python -m producers`` (the
``edsam-produce`` console script) is its process entry point. Its stages are
read -> generate -> filter -> deliver (a sink of :mod:`edsam_online.sinks`: stream or shards). With
``producer.pipeline`` (the default) the generator never waits on the host: real data is
read, decoded and batched ahead in a torchdata.nodes graph (:func:`real_batches`), and
the generated batches are delivered, in order, by one background thread while the next
batch generates (docs/design.md, 'The producer's threads'). ``pipeline=false`` runs the
same stages one after another in one thread.

Sends wait a bounded time for room (``producer.send_timeout_s``): a message that still
cannot go is dropped and counted (``producer/dropped_unsent``), so a producer never waits
on trainers for longer than that. SIGINT/SIGTERM stop it: no new batch is started, the
samples already generated get at most ``stop_grace_s`` (from the stop) to be sent (a
message still blocked then is dropped, the ones not tried are counted in
``producer/unsent_at_stop``), then sockets close (flushing for at most ``stop_grace_s``
more) and :meth:`Producer.run` returns (the CLI exits 0). Every generated sample is counted
once, where it left (:mod:`edsam_online.ledger`); the last JSONL record is marked final.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from torchdata.nodes import BaseNode, Batcher, Mapper, Prefetcher
from tqdm import tqdm

from edsam_online.data import DataCounters, RealDataConfig, RealSample, decoded_samples
from edsam_online.feedback import FeedbackConfig
from edsam_online.ledger import FINAL_KEY, PRODUCER_COUNTERS
from edsam_online.metrics import LoggingConfig, MetricLogger
from edsam_online.policy import POLICIES, AdversarialConfig, AdversarialPolicy, policy_file
from edsam_online.runtime import StopOnSignal
from edsam_online.sinks import Handoff, ProgressLog, open_sink
from edsam_online.steering import ProducerSteering, open_steering
from edsam_online.streaming import StreamConfig
from edsam_online.validation import require_at_least, require_at_most
from edsam_online.wire import MAX_THUMB_PX, source_thumbnails

if TYPE_CHECKING:  # annotations only: the sampler is passed in, this module needs no diffusion stack
    from edsam_online.diffusion import EDSAMSampler, GeneratedBatch

log = logging.getLogger(__name__)

SINKS = ("stream", "shards")
SCORERS = ("none", "attributes", "clip")  # built by edsam_online.diffusion.scoring.build_scorer


@dataclass
class ProducerConfig:
    """One producer rank (``launch.sh`` sets ``rank``/``num_producers``).

    The producer reads partition ``rank`` of ``num_producers`` of the real data
    and seeds generation from (``seed``, ``rank``, batch index). It binds
    ``stream.endpoints[endpoint_index]`` (default: ``rank``; multi-node launches
    whose endpoint list is per node set it to the local index). ``num_samples = 0``
    runs until SIGINT/SIGTERM. A message that cannot be sent within
    ``send_timeout_s`` (every trainer's queue full, or none connected) is dropped
    and counted (``producer/dropped_unsent``). ``stats_every``: forward ``producer/*``
    stats in one header out of N on average (chosen at random, so that every trainer
    behind the round-robin PUSH gets them). ``threads`` > 0 sets torch's intra-op
    threads (0: torch's default); on a small CPU box shared with a trainer, 1 avoids
    oversubscribed OpenMP spinning. ``log_every_s``: see :class:`~edsam_online.sinks.ProgressLog`.

    ``sink="shards"`` is the paper's offline pipeline: instead of streaming, the producer
    writes its samples to webdataset shards in the img2dataset layout under ``shard_dir``
    (``<name>-<session>-NNNNNN.tar``, ``shard_samples`` samples each; ``key.png`` for raw
    ``stream.encoding``, else ``key.jpg``/``key.webp``, ``key.txt`` the caption,
    ``key.json`` the sample's provenance), for a trainer to read with ``method.offline_shards``.

    The online fidelity filter: ``scorer`` (``none``, ``attributes``: the built-in domains'
    class/colour/size measurers, or ``clip``: CLIP score under the open_clip model
    ``scorer_model`` with weights ``scorer_pretrained``, a tag or checkpoint file) scores every
    generated sample against its caption in [0, 1] before it is sent; the score travels in the
    header, and samples below ``min_score`` are dropped and counted (``producer/filtered``).

    ``policy``: how each sample's alpha is chosen (:mod:`edsam_online.policy`): ``uniform``
    is Eq. 9; ``adversarial`` steers it by the loss the trainers report back on the samples
    (settings in ``adversarial``; the channel in the root config's ``feedback``,
    :mod:`edsam_online.steering`).

    ``pipeline`` (default true): the generator never waits on the host. ``data_workers``
    threads decode and resize real images ahead and ``prefetch_batches`` batches wait ready
    for ``generate``; one background thread encodes and sends (or writes) the generated
    batches in order, with at most ``queue_batches`` of them waiting for it. ``pipeline=false``
    is the sequential loop (read, generate, filter, encode, send, one after another in one
    thread): the baseline of ``bench/bench_producer.py`` and the choice for a one-core box;
    it ignores the three sizes. ``source_thumb_px``: the side of a thumbnail of each source image
    sent with its samples, which trainers show beside the samples they log (0 = none).
    """

    rank: int = 0
    num_producers: int = 1
    endpoint_index: int | None = None
    producer_id: str = ""
    num_samples: int = 0
    batch_size: int = 2
    m: int | None = None
    seed: int = 0
    send_timeout_s: float = 30.0
    stop_grace_s: float = 5.0
    stats_every: int = 20
    log_every_s: float = 10.0
    threads: int = 0
    sink: str = "stream"
    shard_dir: str = ""
    shard_samples: int = 1000
    scorer: str = "none"
    scorer_model: str = ""
    scorer_pretrained: str = ""
    min_score: float = 0.0
    pipeline: bool = True
    data_workers: int = 2
    prefetch_batches: int = 2
    queue_batches: int = 2
    policy: str = "uniform"
    source_thumb_px: int = 32
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    @property
    def name(self) -> str:
        """``producer_id``, or ``producer-<rank>`` when it is left empty (computed, so a
        ``producer.rank`` override is never shadowed by a name frozen at config-schema time)."""
        return self.producer_id or f"producer-{self.rank}"

    def __post_init__(self) -> None:
        require_at_least(self, 1, "num_producers")
        if not 0 <= self.rank < self.num_producers:
            raise ValueError(f"rank must be in [0, num_producers={self.num_producers}), got {self.rank}")
        if self.endpoint_index is not None and self.endpoint_index < 0:
            raise ValueError(f"endpoint_index must be >= 0 or null, got {self.endpoint_index}")
        require_at_least(self, 0, "num_samples", "threads", "data_workers", "source_thumb_px")
        require_at_least(self, 1, "batch_size", "stats_every", "prefetch_batches", "queue_batches")
        if self.m is not None and self.m < 1:
            raise ValueError(f"m must be >= 1 or null, got {self.m}")
        if self.sink not in SINKS:
            raise ValueError(f"sink must be one of {SINKS}, got {self.sink!r}")
        if self.sink == "shards" and not self.shard_dir:
            raise ValueError("shard_dir must be set when producer.sink is shards")
        require_at_least(self, 1, "shard_samples")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.min_score > 0 and self.scorer == "none":
            raise ValueError("min_score > 0 needs a scorer: set producer.scorer to attributes or clip")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "adversarial" and self.sink != "stream":
            raise ValueError("policy adversarial needs producer.sink=stream: offline shards get no feedback")
        if self.scorer == "clip" and not self.scorer_model:
            raise ValueError("scorer_model must name an open_clip model when producer.scorer is clip")
        require_at_least(self, 0, "send_timeout_s", "stop_grace_s", "log_every_s")
        require_at_most(self, MAX_THUMB_PX, "source_thumb_px")


def batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """Generation seed of one batch: distinct per (seed, producer rank, batch), below 2**30
    so the sampler's per-image ``seed + i`` stays a valid 31-bit seed."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1)[0] >> 2)


# ----------------------------------------------------------------------------- stages


@dataclass
class RealBatch:
    """``producer.batch_size`` real pairs, as :meth:`EDSAMSampler.generate` takes them."""

    images: np.ndarray  # uint8 [B, H, W, 3]
    captions: list[str]
    keys: list[str]


def _collate(samples: list[RealSample]) -> RealBatch:
    return RealBatch(np.stack([s.image for s in samples]), [s.caption for s in samples], [s.key for s in samples])


def real_batches(cfg: RealDataConfig, rank: int, world_size: int, counters: DataCounters, batch_size: int,
                 num_workers: int = 0, prefetch: int = 0) -> BaseNode[RealBatch]:
    """A producer's real data as a torchdata.nodes graph::

        decoded_samples(num_workers decoding threads) -> Batcher(batch_size) -> collate -> Prefetcher(prefetch)

    Images come decoded and resized to ``cfg.resolution``, ``batch_size`` of them stacked
    (the last batch of a finite source may be shorter). ``num_workers=0, prefetch=0`` runs
    every step in the caller's thread when it asks for a batch.
    """
    batches = Mapper(Batcher(decoded_samples(cfg, rank, world_size, counters, num_workers), batch_size,
                             drop_last=False), _collate)
    return Prefetcher(batches, prefetch_factor=prefetch) if prefetch else batches


# ----------------------------------------------------------------------------- the loop


class Producer:
    """One producer rank: reads its partition of the real data, generates with ``sampler``
    (an :class:`~edsam_online.diffusion.EDSAMSampler`) and streams the samples.

    ``resolution``: the generator's input size (``diffusion.resolution``); real images are
    read at it, so decoding and resizing happen in the data graph rather than inside
    ``generate`` (None: ``data_cfg.resolution``). ``logging_cfg`` + ``run_dir``: metrics also
    go to a ``MetricLogger`` (``<run_dir>/metrics/producer<rank>.jsonl``; ``resolved``, the
    resolved config as a plain dict, is its W&B run config). ``on_bound`` is
    called with the resolved endpoint after a bind (useful with ``tcp://host:*``). ``scorer``:
    the fidelity scorer ``cfg.scorer`` names (:func:`edsam_online.diffusion.scoring.build_scorer`;
    None for ``none``); it runs in the generating thread, beside the generator. :meth:`stop`
    (from any thread) stops it as a signal does; ``install_signal_handlers`` makes
    SIGINT/SIGTERM do so while :meth:`run` runs in the main thread.
    """

    def __init__(
        self,
        stream_cfg: StreamConfig,
        cfg: ProducerConfig,
        data_cfg: RealDataConfig,
        sampler: EDSAMSampler,
        *,
        resolution: int | None = None,
        logging_cfg: LoggingConfig | None = None,
        run_dir: str | None = None,
        resolved: dict | None = None,
        on_bound: Callable[[str], None] | None = None,
        install_signal_handlers: bool = True,
        scorer: Callable[[np.ndarray, list[str]], np.ndarray] | None = None,
        feedback: FeedbackConfig | None = None,
    ) -> None:
        if (scorer is None) != (cfg.scorer == "none"):
            raise ValueError(f"producer.scorer={cfg.scorer!r} needs {'no' if cfg.scorer == 'none' else 'a'} scorer")
        if cfg.policy == "adversarial" and scorer is None:
            raise ValueError("producer.policy=adversarial needs a fidelity scorer (producer.scorer)")
        self.stream_cfg, self.cfg, self.data_cfg, self.sampler = stream_cfg, cfg, data_cfg, sampler
        self.resolution, self.scorer = resolution, scorer
        self.logging_cfg, self.run_dir, self.resolved, self.on_bound = logging_cfg, run_dir, resolved, on_bound
        self.install_signal_handlers = install_signal_handlers
        self.feedback = feedback or FeedbackConfig()
        self.steering: ProducerSteering | None = None
        self._stop = threading.Event()
        self.counters = DataCounters()
        self.state = {**dict.fromkeys(PRODUCER_COUNTERS, 0), "unet_calls": 0, "blocked_s": 0.0, "generate_s": 0.0}
        self._start = time.monotonic()

    def stop(self) -> None:
        """Stop as SIGINT/SIGTERM does (thread-safe): no new batch, the grace for the rest."""
        self._stop.set()

    def metrics(self) -> dict[str, float]:
        """The ``producer/*`` metrics so far (the ones forwarded in headers and logged)."""
        state = self.state
        elapsed = max(time.monotonic() - self._start, 1e-6)
        out = {
            "producer/samples_per_s": state["sent"] / elapsed,
            "producer/unet_calls_per_s": state["unet_calls"] / elapsed,
            "producer/generate_s": state["generate_s"],
            "producer/generator_busy_frac": min(1.0, state["generate_s"] / elapsed),
            "producer/send_blocked_s": state["blocked_s"],
            **{f"producer/{k}": state[k] for k in PRODUCER_COUNTERS},
        }
        out.update({f"producer/{k}": v for k, v in self.counters.snapshot().items()})  # "data/..." keys
        if self.steering is not None:  # forwarded with the rest, so trainers' W&B runs show the loop
            out["producer/feedback_applied"] = self.steering.ledger.applied
            out["producer/feedback_dropped"] = sum(self.steering.ledger.dropped.values())
        return out

    def run(self) -> dict[str, float]:
        """Generate and stream until stopped, ``num_samples`` are sent, or a finite data set
        runs out; returns the final ``producer/*`` metrics. A failure of the delivery thread
        is raised here, at the latest after the batch being generated when it happened."""
        pcfg, stream_cfg = self.cfg, self.stream_cfg
        if pcfg.threads:
            import torch

            torch.set_num_threads(pcfg.threads)
        stop = StopOnSignal(self._stop, f"producer {pcfg.name} stops: no new batch; what was generated is delivered "
                            f"first (a stream: stop_grace_s={pcfg.stop_grace_s:g}s)", self.install_signal_handlers)
        metric_logger = (MetricLogger(self.logging_cfg, self.run_dir, role="producer", rank=pcfg.rank,
                                      config=self.resolved) if self.logging_cfg is not None and self.run_dir else None)
        session = secrets.randbits(62)
        limit = pcfg.num_samples
        bar = tqdm(total=limit or None, desc=pcfg.name, unit="sample", mininterval=5.0, disable=None)
        sink = self._open_delivery(session, bar)
        data_cfg = self.data_cfg if self.resolution is None else dataclasses.replace(self.data_cfg,
                                                                                     resolution=self.resolution)
        batches = real_batches(data_cfg, pcfg.rank, pcfg.num_producers, self.counters, pcfg.batch_size,
                               pcfg.data_workers if pcfg.pipeline else 0, pcfg.prefetch_batches if pcfg.pipeline else 0)
        # The sink belongs to the delivery thread until it has ended.
        handoff = Handoff(sink, pcfg.queue_batches if pcfg.pipeline else 0, f"{pcfg.name}-send")
        state = self.state
        self._start = time.monotonic()
        progress = ProgressLog(pcfg.name, pcfg.log_every_s, metric_logger)
        try:
            for batch_index in itertools.count():
                if not self._wants_more(handoff, limit):
                    break
                batch = next(batches, None)
                if batch is None:
                    log.info("producer %s: real data exhausted", pcfg.name)
                    break
                generated = self._filter(self._generate(batch, batch_index))
                if generated is not None:
                    handoff.put(generated, self._stop.is_set)
                if progress.due():
                    progress.report(self.logged_metrics(), sink.totals(), handoff.pending())
                    if self.steering is not None:
                        self.steering.save_policy()
            handoff.finish()
        except BaseException:
            self._stop.set()  # the batch in flight gets the grace, the queued ones are dropped
            raise
        finally:
            handoff.shutdown()
            bar.close()
            final = self.logged_metrics()
            sink.close()
            if self.steering is not None:
                self.steering.close()
            stop.restore()
            if metric_logger is not None:
                metric_logger.log({**final, FINAL_KEY: 1}, step=state["sent"])
                metric_logger.close()
        log.log(logging.WARNING if state["dropped_unsent"] or state["unsent_at_stop"] else logging.INFO,
                "producer %s: done: %s; %d filtered below min_score", pcfg.name, sink.totals(), state["filtered"])
        return final

    def logged_metrics(self) -> dict[str, float]:
        """:meth:`metrics`, and a steered producer's ``feedback/*`` and ``policy/*``
        (:meth:`~edsam_online.steering.ProducerSteering.metrics`), which stay out of headers."""
        return {**self.metrics(), **(self.steering.metrics() if self.steering is not None else {})}

    def _open_delivery(self, session: int, bar: tqdm):
        """The sink, and with ``policy=adversarial`` the steering it advertises and records to."""
        self.steering = self._open_steering(session) if self.cfg.policy == "adversarial" else None
        try:
            return open_sink(self.cfg, self.stream_cfg, self.state, session, self._stop, self.metrics, bar,
                             self.on_bound, self.steering)
        except BaseException:
            if self.steering is not None:
                self.steering.close()
            raise

    def _open_steering(self, session: int) -> ProducerSteering:
        pcfg = self.cfg
        steering = open_steering(self.stream_cfg, pcfg.rank if pcfg.endpoint_index is None else pcfg.endpoint_index,
                                 AdversarialPolicy(self.sampler.cfg.rho, pcfg.adversarial, seed=[pcfg.seed, pcfg.rank]),
                                 self.feedback, session, name=pcfg.name,
                                 policy_file=policy_file(self.run_dir, pcfg.rank) if self.run_dir else None)
        log.info("producer %s: steered by its trainers' loss; feedback at %s", pcfg.name, steering.endpoint)
        return steering

    # -- stages: read (real_batches) -> generate -> filter -> deliver (the sink)

    def _wants_more(self, handoff: Handoff, limit: int) -> bool:
        """Generate another batch? Not after a stop. With ``limit``, while the samples sent plus
        those still being delivered fall short of it; when the ones being delivered may reach it,
        wait for their outcome (a dropped message must be made up; a surplus batch is not generated)."""
        while not self._stop.is_set():
            # pending before "sent": a delivery ending in between is counted twice, never missed
            pending = handoff.pending()
            if not limit or self.state["sent"] + pending < limit:
                return True
            if not pending:
                return False
            handoff.wait()
        return False

    def _generate(self, batch: RealBatch, batch_index: int) -> GeneratedBatch:
        pcfg = self.cfg
        start = time.monotonic()
        alpha = None
        if self.steering is not None:
            self.steering.poll()
            alpha = self.steering.alphas(len(batch.images) * (pcfg.m or self.sampler.cfg.m))
        generated = self.sampler.generate(batch.images, batch.captions, batch.keys, m=pcfg.m,
                                          seed=batch_seed(pcfg.seed, pcfg.rank, batch_index), alpha=alpha)
        self.state["generate_s"] += time.monotonic() - start
        self.state["generated"] += len(generated)
        self.state["unet_calls"] += generated.unet_calls
        generated.source_thumbs = source_thumbnails(batch.images, pcfg.source_thumb_px)  # None for 0
        return generated

    def _filter(self, generated: GeneratedBatch) -> GeneratedBatch | None:
        """Score ``generated`` and keep the rows at or above ``min_score`` (None: no row is left)."""
        if self.scorer is None:
            return generated
        generated = generated.scored(self.scorer(generated.images, generated.row_captions()))
        keep = generated.score >= self.cfg.min_score
        self.state["filtered"] += int((~keep).sum())
        if keep.all():
            return generated
        return generated.select(keep) if keep.any() else None
