"""Where a producer's generated samples go (``producer.sink``), behind one interface.

* :class:`StreamSink` (``stream``): a ZeroMQ PUSH socket. Each generated batch is packed into
  messages of up to K samples (:func:`samples_per_message`, :func:`encode_fitting`) and sent
  with a bounded wait (:func:`send_bounded`); a message no trainer takes in
  ``producer.send_timeout_s`` is dropped and counted, and after a stop the rest of the batch
  has ``producer.stop_grace_s`` to leave.
* :class:`ShardSink` (``shards``): webdataset shards in ``producer.shard_dir``, the paper's
  generate-then-train pipeline: image, caption and the sample's provenance as JSON.

A sink is driven by one thread at a time (the producer's delivery thread, :class:`Handoff`, or
its loop) and counts where each row it is handed went in the producer's ``state``, once: ``sent``,
``dropped_unsent``, ``unsent_at_stop`` or ``over_limit`` (the producer counts ``generated`` and
``filtered``: :mod:`edsam_online.ledger`), and ``blocked_s``. It says where samples go
(:meth:`Sink.destination`) and what it delivered (:meth:`Sink.totals`) in its own terms: messages
for a stream, shard files and bytes for shards. What a stop costs is counted, not logged per
message or batch: :meth:`Sink.totals` says it once, in the producer's last line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import threading
import time
from collections import deque
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import webdataset as wds
import zmq
from PIL import Image

from edsam_online import security
from edsam_online.streaming import StreamConfig
from edsam_online.wire import encode_image, encode_message, provenance

if TYPE_CHECKING:  # annotations only: this module needs no diffusion stack
    from edsam_online.diffusion import GeneratedBatch
    from edsam_online.metrics import MetricLogger
    from edsam_online.producer import ProducerConfig
    from edsam_online.steering import ProducerSteering

log = logging.getLogger(__name__)

SEND_SLICE_S = 0.2  # a blocked send re-checks the stop flag this often
_SHARD_EXTENSIONS = {"raw": "png", "jpeg": "jpg", "webp": "webp"}


class Sink(Protocol):
    def deliver(self, generated: GeneratedBatch) -> None:
        """Deliver the rows of ``generated``, up to ``producer.num_samples`` sent in all."""

    def close(self) -> None:
        """Release the socket or the shard writer (after the last :meth:`deliver`)."""

    def destination(self) -> str:
        """Where the samples go, for the producer's first line."""

    def totals(self) -> str:
        """What was delivered so far, for the progress lines and the last line."""

    def abandon(self, rows: int) -> None:
        """Count ``rows`` generated samples that a stop (or a failure) left untried."""


def open_sink(pcfg: ProducerConfig, stream_cfg: StreamConfig, state: dict, session: int, stop: threading.Event,
              metrics: Callable[[], dict[str, float]], progress: Any,
              on_bound: Callable[[str], None] | None = None, steering: ProducerSteering | None = None) -> Sink:
    """The sink ``pcfg.sink`` names. ``metrics`` gives the ``producer/*`` metrics a message
    forwards; ``progress`` (a tqdm bar) is advanced by the samples delivered; ``steering``
    (a stream only) advertises its feedback endpoint and records what was sent. Logs where
    the samples go."""
    if pcfg.sink == "shards":
        sink: Sink = ShardSink(pcfg, stream_cfg, state, session, progress)
    else:
        sink = StreamSink(pcfg, stream_cfg, state, session, stop, metrics, progress, on_bound, steering)
    log.info("producer %s: %s", pcfg.name, sink.destination())
    return sink


# ----------------------------------------------------------------------------- sockets


def open_producer_socket(ctx: zmq.Context, cfg: StreamConfig, index: int) -> zmq.Socket:
    """A producer's PUSH socket: binds ``endpoints[index]`` (``producers_bind``) or
    connects to every endpoint. ``sock.last_endpoint`` gives a wildcard bind's port."""
    cfg.check_curve("producer")
    if cfg.producers_bind and index >= len(cfg.endpoints):
        raise ValueError(f"stream.endpoints has {len(cfg.endpoints)} entries, producer endpoint {index} is missing")
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.sndhwm = cfg.sndhwm
        sock.linger = 0  # shutdown is explicit: the in-flight message is sent before close
        sock.reconnect_ivl = cfg.reconnect_ivl_ms
        if cfg.curve:
            security.make_curve_client(sock, cfg.curve_client_secret, cfg.curve_server_public)
        if cfg.producers_bind:
            sock.bind(cfg.endpoints[index])
        else:
            for endpoint in cfg.endpoints:
                sock.connect(endpoint)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


def send_bounded(sock: zmq.Socket, frames: list, timeout_s: float) -> tuple[bool, float]:
    """Send, waiting at most ``timeout_s`` for room (HWM) or a peer.

    Returns (sent, seconds the call took: the wait for room, plus microseconds of
    sending). The wait happens inside libzmq (``SNDTIMEO``), without the GIL: a
    Python retry loop around non-blocking sends costs a wake-up, an exception and a
    poll per message whenever trainers are the bottleneck. ZeroMQ multipart sends
    are atomic, so a timed-out attempt leaves nothing half-sent and can be retried as is.
    """
    sock.sndtimeo = max(0, math.ceil(timeout_s * 1000))
    start = time.monotonic()
    try:
        sock.send_multipart(frames, copy=False)
        return True, time.monotonic() - start
    except zmq.Again:
        return False, time.monotonic() - start


# ----------------------------------------------------------------------------- messages


def samples_per_message(stream_cfg: StreamConfig, sample_nbytes: int) -> int:
    """K for samples of ``sample_nbytes`` raw bytes: ``stream.samples_per_message``, or
    fewer when that many would not fit in ``limits.max_message_bytes`` beside the header."""
    byte_budget = stream_cfg.limits.max_message_bytes - stream_cfg.limits.max_header_bytes
    return min(stream_cfg.samples_per_message, max(1, byte_budget // (sample_nbytes + 1024)))


def encode_fitting(
    generated: GeneratedBatch, first: int, last: int, stream_cfg: StreamConfig, producer_id: str, session: int,
    seq: int, stats: dict[str, float] | None = None, feedback: str | None = None,
) -> tuple[int, list | None]:
    """Encode rows ``first:last`` of ``generated`` as message ``seq``, halving the message
    until its header fits ``limits.max_header_bytes`` (K long captions can outgrow it, and a
    receiver would drop the message). Returns (end of the rows encoded, frames); frames is
    None when a single sample's header does not fit."""
    while True:
        frames = encode_message(generated.rows(first, last), producer_id, session, seq, stats, stream_cfg.encoding,
                                stream_cfg.quality, feedback)
        if len(frames[0]) <= stream_cfg.limits.max_header_bytes:
            return last, frames
        if last - first == 1:
            return last, None
        last = first + (last - first) // 2


# ----------------------------------------------------------------------------- sinks


class StreamSink:
    """Streams generated batches to trainers over one PUSH socket (module docstring).

    ``stop``: once set, the rows not sent yet have ``stop_grace_s`` (from the first time the
    sink sees it) before they are counted ``unsent_at_stop``; :meth:`close` gives queued
    messages as long again to reach a trainer."""

    def __init__(self, pcfg: ProducerConfig, stream_cfg: StreamConfig, state: dict, session: int,
                 stop: threading.Event, metrics: Callable[[], dict[str, float]], progress: Any,
                 on_bound: Callable[[str], None] | None = None, steering: ProducerSteering | None = None) -> None:
        self.pcfg, self.stream_cfg, self.state, self.session = pcfg, stream_cfg, state, session
        self.steering = steering
        self._stop, self._metrics, self._progress = stop, metrics, progress
        self._stopped_at: float | None = None
        self.messages = 0  # sent
        self.dropped_at_stop = 0  # rows of messages still unsent when the stop's grace ran out
        # Random, not every N-th: behind a round-robin PUSH a fixed stride could keep some
        # trainers from ever seeing producer stats.
        self._stats_rng = random.Random(session)
        self._ctx = zmq.Context()
        try:
            self.sock = open_producer_socket(self._ctx, stream_cfg,
                                             pcfg.rank if pcfg.endpoint_index is None else pcfg.endpoint_index)
        except BaseException:
            self._ctx.term()
            raise
        if on_bound is not None and stream_cfg.producers_bind:
            on_bound(self.sock.last_endpoint.decode())

    def deliver(self, generated: GeneratedBatch) -> None:
        """Encode ``generated`` into messages of up to K samples and send them, up to ``num_samples``
        sent in all; a dropped message's samples are made up by the next rows."""
        pcfg, stream_cfg, state, limit = self.pcfg, self.stream_cfg, self.state, self.pcfg.num_samples
        per_message = samples_per_message(stream_cfg, generated.images[0].nbytes)
        first = 0
        while first < len(generated) and not (limit and state["sent"] >= limit) and not self._grace_over():
            last = min(first + per_message, len(generated), first + limit - state["sent"] if limit else len(generated))
            forward = state["sent"] == 0 or self._stats_rng.random() < 1.0 / pcfg.stats_every
            seq = state["sent"]
            last, frames = encode_fitting(generated, first, last, stream_cfg, pcfg.name, self.session, seq,
                                          self._metrics() if forward else None,
                                          self.steering.endpoint if self.steering is not None else None)
            rows, first = slice(first, last), last
            chunk = rows.stop - rows.start
            if frames is None:
                state["dropped_unsent"] += chunk
                log.warning("producer %s: one sample's header exceeds stream.limits.max_header_bytes=%d, "
                            "dropped it", pcfg.name, stream_cfg.limits.max_header_bytes)
                continue
            if self.steering is not None:  # before the send: a trainer may report the samples at once
                self.steering.record(seq, generated.alpha[rows],
                                     None if generated.score is None else generated.score[rows])
            if self._send(frames):
                state["sent"] += chunk
                self.messages += 1
                self._progress.update(chunk)
                if self.steering is not None:
                    self.steering.count_sent(generated.alpha[rows])
            elif self._stop.is_set():  # the grace bounded this send: said once, in totals()
                state["dropped_unsent"] += chunk
                self.dropped_at_stop += chunk
            else:
                state["dropped_unsent"] += chunk
                log.warning("producer %s: no trainer took a message within %.1fs, dropped its %d samples",
                            pcfg.name, pcfg.send_timeout_s, chunk)
        rest = len(generated) - first  # the stop's grace ran out, or num_samples were sent
        if rest and self._grace_over():
            self.abandon(rest)
        else:
            state["over_limit"] += rest

    def close(self) -> None:
        """Give queued messages up to ``stop_grace_s`` to reach a trainer, then drop them."""
        self.sock.close(linger=int(self.pcfg.stop_grace_s * 1000))
        self._ctx.term()

    def destination(self) -> str:
        if self.stream_cfg.producers_bind:
            return f"streams to trainers from {self.sock.last_endpoint.decode()} (bound)"
        return f"streams to trainers at {', '.join(self.stream_cfg.endpoints)} (connected)"

    def totals(self) -> str:
        state = self.state
        text = (f"sent {_count(state['sent'], 'sample')} in {_count(self.messages, 'message')}, "
                f"{state['dropped_unsent']} dropped unsent")
        if self.dropped_at_stop:
            text += f" ({self.dropped_at_stop} when the stop's stop_grace_s={self.pcfg.stop_grace_s:g}s ran out)"
        if state["unsent_at_stop"]:
            text += f", {_count(state['unsent_at_stop'], 'generated sample')} left unsent at the stop"
        return text

    def _stop_deadline(self) -> float | None:
        """None while running; after a stop, until when generated samples may still be sent."""
        if not self._stop.is_set():
            return None
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self._stopped_at + self.pcfg.stop_grace_s

    def _grace_over(self) -> bool:
        deadline = self._stop_deadline()
        return deadline is not None and time.monotonic() >= deadline

    def abandon(self, rows: int) -> None:
        """Count the rows of a batch that the stop's grace left unattempted (:func:`_abandon`).
        Each batch queued at the stop comes here: :meth:`totals` says the sum once."""
        _abandon(self.pcfg, self.state, rows)

    def _send(self, frames: list) -> bool:
        """Bounded send: at most ``send_timeout_s``, and never past the stop's grace."""
        waited = 0.0
        while True:
            budget = self.pcfg.send_timeout_s - waited
            deadline = self._stop_deadline()
            if deadline is not None:
                budget = min(budget, deadline - time.monotonic())
            ok, w = send_bounded(self.sock, frames, max(0.0, min(budget, SEND_SLICE_S)))
            waited += w
            self.state["blocked_s"] += w
            if ok:
                return True
            if budget <= SEND_SLICE_S:
                return False


def _abandon(pcfg: ProducerConfig, state: dict, rows: int) -> None:
    """Count ``rows`` generated samples left untried at a stop: ``unsent_at_stop`` up to
    ``num_samples`` (less those sent or already counted), the rest ``over_limit``."""
    unsent = rows
    if pcfg.num_samples:
        unsent = max(0, min(rows, pcfg.num_samples - state["sent"] - state["unsent_at_stop"]))
    state["unsent_at_stop"] += unsent
    state["over_limit"] += rows - unsent


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _image_file(image: np.ndarray, encoding: str, quality: int) -> bytes:
    """A shard's image file: the wire's JPEG/WebP encoding, or lossless PNG for ``raw``."""
    if encoding != "raw":
        return encode_image(image, encoding, quality)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


class ShardSink:
    """Writes generated samples into webdataset shards of ``producer.shard_samples`` samples,
    named ``<producer>-<session>-<n>.tar`` in ``producer.shard_dir``; images in the stream's
    encoding (``raw``: PNG)."""

    def __init__(self, pcfg: ProducerConfig, stream_cfg: StreamConfig, state: dict, session: int,
                 progress: Any) -> None:
        self.pcfg, self.stream_cfg, self.state, self.session = pcfg, stream_cfg, state, session
        self._progress = progress
        os.makedirs(pcfg.shard_dir, exist_ok=True)
        pattern = os.path.join(pcfg.shard_dir, f"{pcfg.name}-{session:016x}-%06d.tar")
        self.writer = wds.ShardWriter(pattern, maxcount=pcfg.shard_samples, verbose=0)
        self.files: list[str] = []  # the shard files samples went to, in order

    def deliver(self, generated: GeneratedBatch) -> None:
        """Write the rows of ``generated`` (up to ``num_samples`` samples in all) as shard samples."""
        pcfg, state, limit = self.pcfg, self.state, self.pcfg.num_samples
        encoding = self.stream_cfg.encoding
        rows = len(generated) if not limit else min(len(generated), limit - state["sent"])
        for r in range(rows):
            source = int(generated.source[r])
            self.writer.write({
                "__key__": f"{pcfg.name}-{self.session:016x}-{state['sent']:09d}",
                _SHARD_EXTENSIONS[encoding]: _image_file(generated.images[r], encoding, self.stream_cfg.quality),
                "txt": generated.captions[source],
                "json": json.dumps(provenance(generated, r, pcfg.name, self.session, state["sent"])).encode(),
            })
            if self.writer.fname not in self.files[-1:]:
                self.files.append(self.writer.fname)
            state["sent"] += 1
            self._progress.update(1)
        state["over_limit"] += len(generated) - rows

    def close(self) -> None:
        self.writer.close()

    def abandon(self, rows: int) -> None:
        _abandon(self.pcfg, self.state, rows)

    def destination(self) -> str:
        return f"writes shards of {self.pcfg.shard_samples} samples to {self.pcfg.shard_dir}"

    def totals(self) -> str:
        """Samples, files and bytes written (the open file's bytes so far)."""
        nbytes = sum(os.path.getsize(f) for f in self.files if os.path.exists(f))
        return (f"wrote {_count(self.state['sent'], 'sample')} to {_count(len(self.files), 'shard file')} "
                f"({nbytes / 1e6:.1f} MB) in {self.pcfg.shard_dir}")


# ----------------------------------------------------------------------------- progress


class ProgressLog:
    """``producer.log_every_s``: every that many seconds of ``clock`` (0: never) the producer
    logs one progress line and, with ``metric_logger``, a JSONL record of its metrics. The
    line gives the rates over the interval since the previous one, then the totals. The
    producer checks :meth:`due` between batches, so a batch longer than the period delays a
    line, never skips it; the last record and line come at the end either way."""

    def __init__(self, name: str, every_s: float, metric_logger: MetricLogger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.every_s, self.metric_logger, self.clock = name, every_s, metric_logger, clock
        self._since = (clock(), 0.0, 0.0, 0.0)  # time, sent, send_blocked_s, generate_s

    def due(self) -> bool:
        return self.every_s > 0 and self.clock() - self._since[0] >= self.every_s

    def report(self, metrics: dict[str, float], totals: str, waiting: int) -> None:
        """Log the record and the line (:meth:`line`)."""
        if self.metric_logger is not None:
            self.metric_logger.log(metrics, step=int(metrics["producer/sent"]))
        log.info(self.line(metrics, totals, waiting))

    def line(self, metrics: dict[str, float], totals: str, waiting: int) -> str:
        """One line from the ``producer/*`` metrics, the sink's ``totals`` and the samples
        ``waiting`` for delivery; starts the next interval."""
        now = self.clock()
        sent, blocked, busy = (metrics[f"producer/{k}"] for k in ("sent", "send_blocked_s", "generate_s"))
        then, sent0, blocked0, busy0 = self._since
        span = max(now - then, 1e-9)
        self._since = (now, sent, blocked, busy)
        text = (f"producer {self.name}: {(sent - sent0) / span:.2f} samples/s over the last {span:.0f} s "
                f"(generator busy {min(1.0, (busy - busy0) / span):.0%}, "
                f"send blocked {min(1.0, (blocked - blocked0) / span):.0%}); {totals}; "
                f"{int(metrics['producer/filtered'])} filtered below min_score; {waiting} waiting for delivery")
        if "producer/feedback_applied" in metrics:
            text += f"; feedback applied {int(metrics['producer/feedback_applied'])}"
        return text


# ----------------------------------------------------------------------------- the delivery thread


class Handoff:
    """Hands generated batches to ``sink``: in the calling thread (``depth=0``, the
    sequential loop), or in order to one background thread with at most ``depth`` batches
    waiting beside the one it delivers. A ``ThreadPoolExecutor`` of one worker is that thread
    and its FIFO queue; each batch's future keeps its failure, which the calling thread
    re-raises at its next :meth:`put`, :meth:`pending`, :meth:`wait` or :meth:`finish`.
    After a failure the thread delivers nothing more. A batch never delivered (after a failure,
    or dropped by :meth:`shutdown`) is counted by ``sink.abandon``.
    """

    def __init__(self, sink: Sink, depth: int, name: str) -> None:
        self._sink, self._deliver, self._depth = sink, sink.deliver, depth
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=name) if depth else None
        self._queued: deque[tuple[futures.Future, int]] = deque()  # (future, rows), oldest first
        self._failed = False

    def _run(self, generated: GeneratedBatch) -> None:
        if self._failed:  # a batch before this one failed: send nothing after it
            self._sink.abandon(len(generated))
            return
        try:
            self._deliver(generated)
        except BaseException:
            self._failed = True
            raise

    def put(self, generated: GeneratedBatch, stopping: Callable[[], bool]) -> None:
        """Deliver ``generated`` (inline) or queue it, waiting while ``depth`` batches wait,
        unless ``stopping()``: a batch generated before a stop is queued all the same."""
        if self._pool is None:
            self._deliver(generated)
            return
        while len(self._queued) > self._depth and not stopping():
            self.wait()
        self._reap()
        self._queued.append((self._pool.submit(self._run, generated), len(generated)))

    def _reap(self) -> None:
        while self._queued and self._queued[0][0].done():
            self._queued.popleft()[0].result()  # re-raises the delivery's failure

    def pending(self) -> int:
        """Rows of the batches handed over and not delivered yet."""
        self._reap()
        return sum(rows for _, rows in self._queued)

    def wait(self, timeout_s: float = SEND_SLICE_S) -> None:
        """Wait (at most ``timeout_s``) for the oldest batch's delivery to end."""
        if self._queued:
            futures.wait([self._queued[0][0]], timeout_s)
        self._reap()

    def finish(self) -> None:
        """Wait for every batch handed over (a stop bounds it by the grace); re-raises a failure."""
        while self._queued:
            self.wait()

    def shutdown(self) -> None:
        """Drop (and count) the batches not started yet and end the thread (a stop bounds the one in flight)."""
        if self._pool is not None:
            dropped = sum(rows for future, rows in self._queued if future.cancel())
            self._pool.shutdown(wait=True)
            self._sink.abandon(dropped)
