"""A producer rank: real pairs -> ED-SAM sampler -> ZeroMQ PUSH, forever or for N samples.

Never waits on trainers: sends are non-blocking with a bounded wait for room
(``producer.send_timeout_s``); a message that still cannot go is dropped and
counted. SIGINT/SIGTERM stop it after the message in flight: no new batch is
started, the current message gets at most ``stop_grace_s`` to be sent and
flushed, then sockets close and ``run_producer`` returns (the CLI exits 0).
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import secrets
import signal
import threading
import time
from operator import itemgetter
from typing import Any, Callable

import numpy as np
import zmq
from tqdm import tqdm

from edsam_online.streaming import ProducerConfig, StreamConfig, open_producer_socket, send_bounded
from edsam_online.wire import encode_message

log = logging.getLogger(__name__)

_MESSAGE_PROVENANCE = ("mode", "steps", "inversion_steps", "guidance")  # one sampler config per batch


def message_fields(
    producer_id: str, session: int, seq: int, provenance: list[dict], stats: dict[str, float] | None = None
) -> dict[str, Any]:
    """Header fields (:mod:`edsam_online.wire`) for the samples of one message, from the
    sampler's provenance; the numeric sample fields as numpy arrays (the wire's columns).
    ``stats``: the producer's metrics to forward, if any."""
    first, k = provenance[0], len(provenance)
    fields: dict[str, Any] = {
        "producer_id": producer_id,
        "session": session,
        "seq": seq,
        "rho": float(first["rho"]),
        "model_id": str(first["model_id"]),
        "source_key": list(map(itemgetter("source_key"), provenance)),
        "caption": list(map(itemgetter("caption"), provenance)),
        "alpha": np.fromiter(map(itemgetter("alpha"), provenance), np.float64, k),
        "seed": np.fromiter(map(itemgetter("seed"), provenance), np.int64, k),
    }
    fields.update({k: first[k] for k in _MESSAGE_PROVENANCE if k in first})
    if "sample_index" in first:
        fields["sample_index"] = np.fromiter(map(itemgetter("sample_index"), provenance), np.int64, k)
    if stats is not None:
        fields["stats"] = stats
    return fields


def samples_per_message(stream_cfg: StreamConfig, sample_nbytes: int) -> int:
    """K for samples of ``sample_nbytes`` raw bytes: ``stream.samples_per_message``, or
    fewer when that many would not fit in ``max_message_bytes`` beside the header."""
    byte_budget = stream_cfg.max_message_bytes - stream_cfg.max_header_bytes
    return min(stream_cfg.samples_per_message, max(1, byte_budget // (sample_nbytes + 1024)))


def _encode_fitting(
    images: np.ndarray, provenance: list[dict], first: int, last: int, stream_cfg: StreamConfig,
    fields: Callable[[list[dict]], dict[str, Any]],
) -> tuple[int, list | None]:
    """Encode samples ``first:last``, halving the message until its header fits
    ``max_header_bytes`` (K long captions can outgrow it, and a receiver would drop
    the message). Returns (end of the samples encoded, frames); frames is None when a
    single sample's header does not fit."""
    while True:
        frames = encode_message(images[first:last], fields(provenance[first:last]), stream_cfg.encoding,
                                stream_cfg.quality)
        if len(frames[0]) <= stream_cfg.max_header_bytes:
            return last, frames
        if last - first == 1:
            return last, None
        last = first + (last - first) // 2


def batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """Generation seed of one batch: distinct per (seed, producer rank, batch), below 2**30
    so the sampler's per-image ``seed + i`` stays a valid 31-bit seed."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1)[0] >> 2)


class _StopFlag:
    """Set by SIGINT/SIGTERM (or by the caller); restores the previous handlers on exit."""

    def __init__(self, install: bool) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.info("producer: %s received, stopping after the message in flight", signal.Signals(signum).name)
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_producer(
    stream_cfg: StreamConfig,
    producer_cfg: ProducerConfig,
    data_cfg: Any,
    sampler_cfg: Any = None,
    *,
    sampler: Any = None,
    logging_cfg: Any = None,
    run_dir: str | None = None,
    on_bound: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
    install_signal_handlers: bool = True,
) -> dict[str, float]:
    """Generate and stream samples; returns the final ``producer/*`` metrics.

    ``data_cfg`` is an :class:`edsam_online.data.RealDataConfig`; this producer reads
    partition ``producer_cfg.rank`` of ``producer_cfg.num_producers``. ``sampler``
    (an ``EDSAMSampler``) is built from ``sampler_cfg`` when not given.
    ``logging_cfg`` + ``run_dir``: metrics also go to a ``MetricLogger``
    (``<run_dir>/metrics/producer<rank>.jsonl``). ``on_bound`` is called with the
    resolved endpoint after a bind (useful with ``tcp://host:*``). ``stop_event``
    stops it like a signal does.
    """
    from edsam_online.data import DataCounters, iter_real_samples

    if producer_cfg.threads:
        import torch

        torch.set_num_threads(producer_cfg.threads)
    if sampler is None:
        if sampler_cfg is None:
            raise ValueError("run_producer needs sampler or sampler_cfg")
        from edsam_online.diffusion import build_sampler

        sampler = build_sampler(sampler_cfg)
    pcfg = producer_cfg
    stop = _StopFlag(install_signal_handlers)
    if stop_event is not None:
        stop.event = stop_event
    metric_logger = None
    if logging_cfg is not None and run_dir is not None:
        from edsam_online.metrics import MetricLogger

        metric_logger = MetricLogger(logging_cfg, run_dir, role="producer", rank=pcfg.rank)
    ctx = zmq.Context()
    sock = open_producer_socket(ctx, stream_cfg, pcfg.rank if pcfg.endpoint_index is None else pcfg.endpoint_index)
    if on_bound is not None and stream_cfg.producers_bind:
        on_bound(sock.last_endpoint.decode())
    session = secrets.randbits(62)
    stats_rng = random.Random(session)
    counters = DataCounters()
    data = iter_real_samples(data_cfg, pcfg.rank, pcfg.num_producers, counters)
    state = dict(sent=0, generated=0, dropped_unsent=0, unet_calls=0, blocked_s=0.0)
    start = time.monotonic()

    def metrics() -> dict[str, float]:
        elapsed = max(time.monotonic() - start, 1e-6)
        out = {
            "producer/samples_per_s": state["sent"] / elapsed,
            "producer/unet_calls_per_s": state["unet_calls"] / elapsed,
            "producer/send_blocked_s": state["blocked_s"],
            "producer/sent": state["sent"],
            "producer/generated": state["generated"],
            "producer/dropped_unsent": state["dropped_unsent"],
        }
        out.update({f"producer/{k}": v for k, v in counters.snapshot().items()})  # "data/..." keys
        return out

    limit = pcfg.num_samples
    bar = tqdm(total=limit or None, desc=pcfg.name, unit="sample", mininterval=5.0, disable=None)
    last_log = time.monotonic()
    try:
        for batch_index in itertools.count():
            if stop.event.is_set() or (limit and state["sent"] >= limit):
                break
            batch = list(itertools.islice(data, pcfg.batch_size))
            if not batch:
                log.info("producer %s: real data exhausted", pcfg.name)
                break
            generated = sampler.generate(
                np.stack([s.image for s in batch]),
                [s.caption for s in batch],
                [s.key for s in batch],
                m=pcfg.m,
                seed=batch_seed(pcfg.seed, pcfg.rank, batch_index),
            )
            state["unet_calls"] += generated.unet_calls
            images, provenance = generated.images, generated.provenance
            per_message = samples_per_message(stream_cfg, images[0].nbytes)
            first = 0
            while first < len(images):
                if stop.event.is_set() or (limit and state["sent"] >= limit):
                    break
                last = min(first + per_message, len(images), first + limit - state["sent"] if limit else len(images))
                # Random, not every N-th: behind a round-robin PUSH a fixed stride could
                # keep some trainers from ever seeing producer stats.
                stats = metrics() if state["sent"] == 0 or stats_rng.random() < 1.0 / pcfg.stats_every else None
                fields = functools.partial(message_fields, pcfg.name, session, state["sent"], stats=stats)
                last, frames = _encode_fitting(images, provenance, first, last, stream_cfg, fields)
                chunk = last - first
                first = last
                state["generated"] += chunk
                if frames is None:
                    state["dropped_unsent"] += chunk
                    log.warning("producer %s: one sample's header exceeds stream.max_header_bytes=%d, dropped it",
                                pcfg.name, stream_cfg.max_header_bytes)
                elif _send(sock, frames, pcfg, stop.event, state):
                    state["sent"] += chunk
                    bar.update(chunk)
                else:
                    state["dropped_unsent"] += chunk
                    log.warning("producer %s: no trainer took a message within %.1fs, dropped its %d samples",
                                pcfg.name, pcfg.send_timeout_s, chunk)
            if metric_logger is not None and time.monotonic() - last_log >= pcfg.log_every_s:
                metric_logger.log(metrics(), step=state["sent"])
                last_log = time.monotonic()
    finally:
        bar.close()
        final = metrics()
        # Give queued messages up to stop_grace_s to reach a trainer, then drop them.
        sock.close(linger=int(pcfg.stop_grace_s * 1000))
        ctx.term()
        stop.restore()
        if metric_logger is not None:
            metric_logger.log(final, step=state["sent"])
            metric_logger.close()
    log.info("producer %s: sent %d samples (%d dropped unsent)", pcfg.name, state["sent"], state["dropped_unsent"])
    return final


def _send(sock: zmq.Socket, frames: list, pcfg: ProducerConfig, stop: threading.Event, state: dict) -> bool:
    """Bounded send; once a stop is requested the message gets at most ``stop_grace_s`` more."""
    waited = 0.0
    stop_at: float | None = None
    while True:
        budget = pcfg.send_timeout_s - waited
        if stop.is_set():
            stop_at = waited if stop_at is None else stop_at
            budget = min(budget, stop_at + pcfg.stop_grace_s - waited)
        ok, w = send_bounded(sock, frames, max(0.0, min(budget, 0.2)))
        waited += w
        state["blocked_s"] += w
        if ok:
            return True
        if budget <= 0.2:
            return False
