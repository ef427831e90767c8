"""ZeroMQ transport between producer ranks and trainer ranks (no broker).

Topology: producers PUSH, trainers PULL. PUSH load-balances each message to
exactly one connected PULL peer, so trainer ranks see distinct samples. By
default (``producers_bind``) producer ``r`` binds ``endpoints[r]`` and every
receiver connects to all endpoints; with ``producers_bind=False`` receiver
``i`` binds ``endpoints[i]`` and every producer connects to all of them.

The :class:`Receiver` is a background thread in the trainer process: it
validates every message (:mod:`edsam_online.wire`), inserts good ones into the
:class:`~edsam_online.buffer.ReplayBuffer`, and counts everything else. Its
socket lives in its own ``zmq.Context`` so a CURVE authenticator (ZAP handler)
applies to it alone. Security: :mod:`edsam_online.security`.

Sequence numbers: ``buffer/seq_gaps`` counts, per producer session, the numbers
this receiver did not see. With one trainer that is loss; with N trainers each
receiver sees about 1/N of every producer's stream (by design), so loss is the
union over receivers. Duplicates (a sequence number at or below the last one
seen from that session) are dropped as ``buffer/dropped/duplicate``.

The tracker (:class:`~edsam_online.sequence.SequenceTracker`) cannot be poisoned by one
message. A sequence number more than ``StreamConfig.seq_window`` past a session's high-water mark does not move it: the
message is dropped as ``buffer/dropped/seq_out_of_window`` and the stream goes on as
before. A mark pushed ahead anyway (by in-window jumps) makes the session's real
messages duplicates; after ``seq_resync_after`` consecutive refused messages the
tracker re-anchors on the next one and counts ``buffer/seq_resyncs``, so whatever a
peer sends costs a stream at most that many messages, never the rest of it.

The sample ledger (:mod:`edsam_online.ledger`): every sample a producer sent ends in one
count of some receiver: ``buffer/accepted``, ``buffer/dropped_samples/<reason>`` (a dropped
message's samples, as its header states them; ``buffer/dropped_unsized`` counts the dropped
messages whose header is unreadable), or ``buffer/in_flight``: the samples still queued on
the socket when the receiver stops, which it takes off and counts (validated, not inserted)
before closing it, rather than losing them uncounted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from edsam_online import security
from edsam_online.allocator import tune_malloc
from edsam_online.buffer import ReplayBuffer
from edsam_online.sequence import SequenceTracker
from edsam_online.validation import require_at_least
from edsam_online.wire import DROP_REASONS, ENCODINGS, WireError, WireLimits, decode_message

log = logging.getLogger(__name__)

#: Receiver drop reasons: the wire's, plus replays and bugs caught at the top of the loop.
RECEIVER_DROP_REASONS = DROP_REASONS + ("duplicate", "seq_out_of_window", "internal_error")
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_DELAYED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: The receiver's ``buffer/<name>`` counters (docs/metrics.md).
_COUNTERS = ("received", "received_samples", "received_bytes", "accepted", "in_flight", "dropped_unsized", "seq_gaps",
             "seq_resyncs", "sessions", "peer_connects", "peer_disconnects", "auth_failures", "handshake_failures",
             "stats_requests", "rearms")
_PRODUCER_STALE_S = 60.0  # forwarded producer stats older than this are not reported
_MAX_SESSIONS = 4096  # sequence trackers kept (oldest forgotten first)
_SERVICE_EVERY_S = 0.05  # how often a busy receiver looks at its monitor and stats sockets
_REARM_AFTER_S = 1.0  # a connect that libzmq gave up on is re-made after this long
_DRAIN_MAX_S = 2.0  # at the stop, the longest the receiver takes messages off its socket (live producers)


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only (ipc, inproc, tcp on 127/8 or ::1)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    return transport == "tcp" and (host == "localhost" or host == "::1" or host.startswith("127."))


@dataclass
class StreamConfig:
    """Transport settings shared by producers and receivers (Hydra group ``stream``).

    ``limits`` (:class:`~edsam_online.wire.WireLimits`) is what a receiver accepts:
    ``limits.max_message_bytes`` is set as ZeroMQ ``MAXMSGSIZE`` on the receiving socket
    (a peer sending a larger frame is disconnected by libzmq) and bounds the whole
    message in :func:`~edsam_online.wire.decode_message`; a producer packs its messages to
    fit them. ``sndhwm``/``rcvhwm``
    are ZeroMQ high-water marks in messages. ``samples_per_message`` is how many
    samples a producer packs into one message (K in :mod:`edsam_online.wire`): more
    amortises the per-message cost, fewer spreads one producer batch over more
    trainers; in-flight samples are up to ``sndhwm + rcvhwm`` times it (1024 with the
    defaults: bounded in memory and in staleness).
    CURVE (``curve``): the receiver is the
    CURVE server; see :mod:`edsam_online.security` for the key files.
    ``stats_endpoint`` (optional) is where a receiver answers ``buffer-monitor``
    requests; ``{rank}`` in it is replaced by the receiver's rank. It must be a loopback
    address unless ``curve`` is on, and with ``curve`` it is a CURVE server like the data
    socket, answering only the keys of ``curve_allow_dir``. ``tune_malloc``: a
    receiver sets glibc's allocator up for holding received frames before its I/O
    thread starts (process-wide; see :mod:`edsam_online.allocator`). ``seq_window`` and
    ``seq_resync_after`` bound what a message's sequence number can do to its session's
    tracker (module docstring).
    """

    endpoints: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    producers_bind: bool = True
    encoding: str = "raw"
    quality: int = 90
    limits: WireLimits = field(default_factory=WireLimits)
    samples_per_message: int = 64
    sndhwm: int = 8
    rcvhwm: int = 8
    poll_timeout_ms: int = 100
    reconnect_ivl_ms: int = 100
    stats_endpoint: str = ""
    curve: bool = False
    curve_server_public: str = ""
    curve_server_secret: str = ""
    curve_client_secret: str = ""
    curve_allow_dir: str = ""
    tune_malloc: bool = True
    seq_window: int = 1 << 20  # samples a message may jump past its session's high-water mark
    seq_resync_after: int = 8  # consecutive refused messages of a session before it re-anchors

    def __post_init__(self) -> None:
        self.endpoints = list(self.endpoints)
        if not self.endpoints or not all(isinstance(e, str) and "://" in e for e in self.endpoints):
            raise ValueError(f"endpoints must be a non-empty list of ZeroMQ endpoints, got {self.endpoints!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        require_at_least(self, 1, "sndhwm", "rcvhwm", "poll_timeout_ms", "reconnect_ivl_ms", "samples_per_message",
                         "seq_window", "seq_resync_after")
        if self.stats_endpoint and not self.curve and not is_loopback(self.stats_endpoint):
            raise ValueError(f"stats_endpoint {self.stats_endpoint!r} can be reached from other hosts: bind it on "
                             "loopback (tcp://127.0.0.1:PORT) or set stream.curve=true to put it under CURVE")
        if self.samples_per_message > self.limits.max_samples_per_message:
            raise ValueError(f"samples_per_message must be <= limits.max_samples_per_message="
                             f"{self.limits.max_samples_per_message}, got {self.samples_per_message}")

    def check_curve(self, role: str) -> None:
        """Raise ValueError naming the missing CURVE setting for ``role`` ("producer"/"receiver")."""
        if not self.curve:
            return
        needed = (
            ("curve_server_secret", "curve_allow_dir")
            if role == "receiver"
            else ("curve_client_secret", "curve_server_public")
        )
        for name in needed:
            if not getattr(self, name):
                raise ValueError(f"stream.{name} must be set when stream.curve is true ({role})")


# ----------------------------------------------------------------------------- receiver side


def _open_sockets(ctx: zmq.Context, cfg: StreamConfig, endpoints: list[str], rank: int, stats_endpoint: str,
                  opened: list[zmq.Socket]) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket | None]:
    """A receiver's sockets: the PULL data socket (connected to every producer endpoint, or
    bound to ``endpoints[rank]``), its monitor, and the REP stats socket when
    ``stats_endpoint`` is set. Each is appended to ``opened`` as soon as it exists, for the
    caller to close whatever happens."""
    sock = ctx.socket(zmq.PULL)
    opened.append(sock)
    sock.rcvhwm = cfg.rcvhwm
    sock.maxmsgsize = cfg.limits.max_message_bytes
    sock.linger = 0
    sock.reconnect_ivl = cfg.reconnect_ivl_ms
    if cfg.curve:
        security.make_curve_server(sock, cfg.curve_server_secret)
    monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
    opened.append(monitor)
    if cfg.producers_bind:
        for endpoint in endpoints:
            sock.connect(endpoint)
    else:
        sock.bind(endpoints[rank])
    stats_sock = None
    if stats_endpoint:
        stats_sock = ctx.socket(zmq.REP)
        opened.append(stats_sock)
        stats_sock.maxmsgsize = 4096
        stats_sock.linger = 0
        if cfg.curve:
            security.make_curve_server(stats_sock, cfg.curve_server_secret)
        stats_sock.bind(stats_endpoint)
    return sock, monitor, stats_sock


def _claimed_samples(frames: list, limits: WireLimits) -> int | None:
    """How many samples a message says it carries (the length of its header's ``nbytes``
    column), read without validating the rest; None when the header does not say."""
    if len(frames) != 2 or len(frames[0]) > limits.max_header_bytes:
        return None
    try:
        header = msgpack.unpackb(getattr(frames[0], "buffer", frames[0]), raw=False)
    except Exception:  # noqa: BLE001 - a dropped message's header may be anything
        return None
    nbytes = header.get("nbytes") if isinstance(header, dict) else None
    return len(nbytes) // 8 if isinstance(nbytes, bytes) and nbytes and len(nbytes) % 8 == 0 else None


def _drain(sock: zmq.Socket, handle: Callable[[list], None], poll_timeout_ms: int) -> None:
    """Hand every message still queued on ``sock`` (and arriving within ``poll_timeout_ms`` of
    the last, for at most ``_DRAIN_MAX_S``) to ``handle``: what a stop would otherwise lose."""
    sock.rcvtimeo = poll_timeout_ms
    deadline = time.monotonic() + _DRAIN_MAX_S
    while time.monotonic() < deadline:
        try:
            handle(sock.recv_multipart(copy=False))
        except zmq.Again:
            return


def _answer_stats(stats_sock: zmq.Socket, receiver: Receiver) -> None:
    """Answer a ``buffer-monitor`` request waiting on ``stats_sock``, if any."""
    try:
        stats_sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return
    receiver._count("stats_requests")
    reply = {**receiver.stats(), **receiver.producer_stats(), "receiver/rank": receiver.rank, "time": time.time()}
    stats_sock.send(msgpack.packb(reply))


def _close_sockets(opened: list[zmq.Socket]) -> None:
    """Close what :func:`_open_sockets` opened, the data socket's monitor first."""
    if opened:
        try:
            opened[0].disable_monitor()
        except zmq.ZMQError:
            pass
    for sock in reversed(opened):
        sock.close(linger=0)


class _PeerWatch:
    """The receiver's view of its peers, from the data socket's monitor: counts connects,
    disconnects and failed handshakes (``count(name)``), refuses peers whose CURVE key is not
    allowed, and re-connects endpoints that libzmq dropped and will not retry."""

    def __init__(self, cfg: StreamConfig, endpoints: list[str], rank: int, count: Callable[[str], None]) -> None:
        self.cfg, self.endpoints, self.rank, self._count = cfg, endpoints, rank, count
        self._dropped_connects: dict[str, float] = {}  # endpoint -> when libzmq dropped it
        self._established: set[str] = set()  # endpoints whose handshake succeeded

    def drain(self, monitor: zmq.Socket, sock: zmq.Socket) -> None:
        """Count the monitor's events; note established connections libzmq dropped; refuse
        peers that failed CURVE authentication."""
        names = {
            zmq.EVENT_HANDSHAKE_SUCCEEDED: "peer_connects",
            zmq.EVENT_DISCONNECTED: "peer_disconnects",
            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failures",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failures",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failures",
        }
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            endpoint = event["endpoint"].decode(errors="replace")
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._established.add(endpoint)
            elif event["event"] == zmq.EVENT_DISCONNECTED and endpoint in self._established:
                self._established.discard(endpoint)
                if self.cfg.producers_bind and endpoint in self.endpoints:
                    self._dropped_connects[endpoint] = time.monotonic()
            elif event["event"] in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECTED):
                self._dropped_connects.pop(endpoint, None)  # libzmq is reconnecting by itself
            name = names.get(event["event"])
            if name is not None:
                self._count(name)
                if name == "auth_failures":
                    self.refuse(sock, endpoint)

    def refuse(self, sock: zmq.Socket, endpoint: str) -> None:
        """Stop connecting to a producer endpoint whose CURVE key is not allowed.

        libzmq would retry it every ``reconnect_ivl``; besides the noise, a CURVE
        handshake in flight while the socket is torn down makes libzmq abort
        (zap_client.cpp:50), so a refused endpoint is dropped until restart.
        """
        log.warning("receiver %d refused the peer at %s (CURVE key not on the allow-list)", self.rank, endpoint)
        if self.cfg.producers_bind and endpoint in self.endpoints:
            try:
                sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass

    def rearm(self, sock: zmq.Socket) -> None:
        """Re-connect endpoints libzmq will not retry by itself.

        After a protocol error on an established connection (e.g. a frame above
        ``MAXMSGSIZE``) libzmq terminates a connecting session instead of
        reconnecting; without this, one bad message would cut a trainer off a
        producer for good. Normal disconnects are followed by ``CONNECT_RETRIED``
        and left alone, and so are peers that never completed a handshake.
        """
        now = time.monotonic()
        for endpoint, since in list(self._dropped_connects.items()):
            if now - since < _REARM_AFTER_S:
                continue
            del self._dropped_connects[endpoint]
            try:
                sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass  # already gone
            sock.connect(endpoint)
            self._count("rearms")
            log.warning("receiver %d: re-connecting to %s after libzmq dropped it", self.rank, endpoint)


class Receiver:
    """Background thread: PULL socket -> validate -> ``buffer.insert``.

    ``rank`` picks the endpoint a receiver binds when ``producers_bind`` is false,
    and fills ``{rank}`` in ``cfg.stats_endpoint``. ``endpoints`` overrides
    ``cfg.endpoints`` (e.g. for tests). ``start()`` returns once the socket is set
    up (raising what went wrong, e.g. a bad key file); ``stop()`` drains the socket
    (``buffer/in_flight``) and returns. The buffer keeps serving after ``stop()``.
    """

    def __init__(self, cfg: StreamConfig, buffer: ReplayBuffer, rank: int = 0, endpoints: list[str] | None = None,
                 stats_endpoint: str | None = None) -> None:
        cfg.check_curve("receiver")
        self.cfg, self.buffer, self.rank = cfg, buffer, rank
        self.endpoints = list(endpoints if endpoints is not None else cfg.endpoints)
        if not cfg.producers_bind and rank >= len(self.endpoints):
            raise ValueError(f"stream.endpoints has {len(self.endpoints)} entries, receiver rank {rank} needs its own")
        template = cfg.stats_endpoint if stats_endpoint is None else stats_endpoint
        self.stats_endpoint = template.replace("{rank}", str(rank)) if template else ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.bound_endpoints: list[str] = []  # resolved addresses of what this receiver bound
        self._dropped = dict.fromkeys(RECEIVER_DROP_REASONS, 0)
        self._dropped_samples = dict.fromkeys(RECEIVER_DROP_REASONS, 0)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._latency_ema = 0.0
        self._sequences = SequenceTracker(cfg.seq_window, cfg.seq_resync_after, _MAX_SESSIONS)
        self._producer_stats: dict[str, tuple[float, dict[str, float]]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 10.0) -> Receiver:
        if self._thread is not None:
            raise RuntimeError("Receiver already started")
        self._thread = threading.Thread(target=self._run, name=f"edsam-receiver-{self.rank}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"receiver socket not ready after {timeout_s}s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ metrics

    @property
    def accepted(self) -> int:
        """Samples accepted into the buffer so far (cheap; for polling)."""
        return self._counters["accepted"]

    def stats(self) -> dict[str, float]:
        """Buffer stats plus receiver counters: ``buffer/received`` (messages), ``buffer/received_samples``,
        ``buffer/accepted`` (samples), ``buffer/dropped`` (messages, total) and ``buffer/dropped/<reason>``,
        the same in samples (``buffer/dropped_samples``...), ``buffer/in_flight``, ``buffer/seq_gaps``, ..."""
        out = self.buffer.stats()
        with self._lock:
            out.update({f"buffer/{k}": v for k, v in self._counters.items()})
            out["buffer/dropped"] = sum(self._dropped.values())
            out.update({f"buffer/dropped/{k}": v for k, v in self._dropped.items()})
            out["buffer/dropped_samples"] = sum(self._dropped_samples.values())
            out.update({f"buffer/dropped_samples/{k}": v for k, v in self._dropped_samples.items()})
            out["buffer/latency_s"] = self._latency_ema
        return out

    def producer_stats(self) -> dict[str, float]:
        """Latest ``producer/*`` metrics forwarded by producers heard from in the last
        minute, summed over producers (rates and totals add up), plus ``producer/active``."""
        now = time.monotonic()
        out: dict[str, float] = {}
        active = 0
        with self._lock:
            for seen, stats in self._producer_stats.values():
                if now - seen > _PRODUCER_STALE_S:
                    continue
                active += 1
                for key, value in stats.items():
                    out[key] = out.get(key, 0.0) + float(value)
        out["producer/active"] = active
        return out

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        if self.cfg.tune_malloc:
            tune_malloc()  # before the context's I/O thread first allocates
        ctx = zmq.Context()
        auth = None
        sockets: list[zmq.Socket] = []
        try:
            try:
                if self.cfg.curve:
                    auth = security.start_authenticator(ctx, self.cfg.curve_allow_dir)
                sock, monitor, stats_sock = _open_sockets(ctx, self.cfg, self.endpoints, self.rank,
                                                          self.stats_endpoint, sockets)
                if not self.cfg.producers_bind:
                    self.bound_endpoints.append(sock.last_endpoint.decode())
                if stats_sock is not None:
                    self.stats_endpoint = stats_sock.last_endpoint.decode()
            except BaseException as err:  # reported to start()
                self._error = err
                return
            finally:
                self._ready.set()
            # Block on the data socket (inside libzmq, without the GIL) and look at the
            # monitor and stats sockets between messages, at most every 50 ms while
            # messages flow, rather than polling all three for every message.
            sock.rcvtimeo = self.cfg.poll_timeout_ms
            peers = _PeerWatch(self.cfg, self.endpoints, self.rank, self._count)
            next_service = 0.0
            while not self._stop.is_set():
                try:
                    frames = sock.recv_multipart(copy=False)
                except zmq.Again:  # nothing for poll_timeout_ms
                    frames = None
                if frames is not None:
                    self._take(frames)
                now = time.monotonic()
                if frames is None or now >= next_service:
                    next_service = now + _SERVICE_EVERY_S
                    peers.drain(monitor, sock)
                    if stats_sock is not None:
                        _answer_stats(stats_sock, self)
                    peers.rearm(sock)
            _drain(sock, lambda frames: self._take(frames, insert=False), self.cfg.poll_timeout_ms)
        finally:
            _close_sockets(sockets)
            if auth is not None:
                auth.stop()
            ctx.term()

    def _drop(self, reason: str, detail: str, samples: int | None) -> None:
        with self._lock:
            self._dropped[reason] += 1
            self._dropped_samples[reason] += samples or 0
            self._counters["dropped_unsized"] += samples is None
            first = self._dropped[reason] == 1
        (log.warning if first else log.debug)("receiver %d dropped a message: %s %s", self.rank, reason, detail)

    def _take(self, frames: list[zmq.Frame], insert: bool = True) -> None:
        try:
            self._handle(frames, insert)
        except Exception:  # noqa: BLE001 - a bug here must not kill the receiver
            log.exception("receiver: unexpected error handling a message (dropped)")
            self._drop("internal_error", "", _claimed_samples(frames, self.cfg.limits))

    def _handle(self, frames: list[zmq.Frame], insert: bool = True) -> None:
        """Validate and insert a message (``insert=False``, the stop's drain: count it in flight)."""
        now = time.time()
        try:
            header, samples = decode_message(frames, self.cfg.limits, received_at=now)
        except WireError as err:
            with self._lock:
                self._counters["received"] += 1
                self._counters["received_bytes"] += sum(len(f.buffer) for f in frames)
            self._drop(err.reason, err.detail, _claimed_samples(frames, self.cfg.limits))
            return
        key = (header["producer_id"], header["session"])
        seq, k = header["seq"], len(samples)
        with self._lock:
            self._counters["received"] += 1
            self._counters["received_samples"] += k
            self._counters["received_bytes"] += len(frames[0]) + len(frames[1])
            verdict = self._sequences.observe(key, seq, k)
            if verdict.refused is None:
                self._counters["sessions"] += verdict.new_session
                self._counters["seq_resyncs"] += verdict.resynced
                self._counters["seq_gaps"] += verdict.gaps
                if "stats" in header:
                    self._producer_stats[header["producer_id"]] = (time.monotonic(), header["stats"])
                self._counters["accepted" if insert else "in_flight"] += k
                self._latency_ema += 0.05 * ((now - header["created_at"]) - self._latency_ema)
        if verdict.refused is not None:
            self._drop(verdict.refused, f"{key} seq {seq}, high-water mark {verdict.mark}", k)
        elif insert:
            self.buffer.insert_many(samples)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1
