"""The closed loop's sockets: a steered producer's feedback endpoint, and the trainers' senders.

Topology. Each producer with ``producer.policy=adversarial`` binds one PULL socket of its own
(:class:`ProducerSteering`) and advertises it in the header of every message it sends
(``feedback``, :mod:`edsam_online.wire`). A trainer rank learns the endpoint from the samples
it draws and connects one PUSH socket per producer endpoint (:class:`FeedbackSender`), so
feedback reaches the producer that made each sample for P producers x N trainers, across
hosts, and a restarted producer (a new session, a new endpoint) is found the same way.

Binding. The feedback socket binds next to the producer's data endpoint: the same host with a
port of the system's choosing (``tcp://127.0.0.1:5555`` -> ``tcp://127.0.0.1:*``), or
``<path>.feedback`` for ``ipc://``. A wildcard host (``*``, ``0.0.0.0``) or a producer that
connects (``stream.producers_bind=false``) binds every interface and advertises
``socket.gethostname()``.

Never blocking, never silenced. A trainer sends with ``NOBLOCK`` through a queue of
``feedback.sndhwm`` messages per producer: a full queue drops the message, counted as
``feedback/send_dropped``, and the step goes on. A producer drains its socket before each
batch, at most ``max_messages`` per batch, and every message is checked
(:class:`~edsam_online.feedback.FeedbackLedger`) before the policy learns from it.

CURVE (``stream.curve``). The roles of the forward stream are kept: each trainer's PUSH
socket is the CURVE *server* with the receiver key pair and answers only the producer keys of
``stream.curve_allow_dir``; each producer's feedback socket is a CURVE *client* that accepts
only a server holding the receiver's secret key. So a producer hears only trainers, and a
trainer talks only to allowed producers. (CURVE roles are independent of bind and connect.)
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import zmq

from edsam_online import security
from edsam_online.feedback import (DROP_REASONS, FeedbackConfig, FeedbackError, FeedbackLedger, decode_feedback,
                                   encode_feedback)
from edsam_online.policy import AdversarialPolicy, load_policy, save_policy
from edsam_online.streaming import StreamConfig

log = logging.getLogger(__name__)
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")
IDLE_FLUSHES = 100


def feedback_bind_endpoint(data_endpoint: str | None) -> str:
    """Where a producer binds its feedback socket (module docstring, 'Binding')."""
    if data_endpoint and data_endpoint.startswith("ipc://"):
        return data_endpoint + ".feedback"
    if data_endpoint and data_endpoint.startswith("tcp://"):
        host = urlsplit(data_endpoint).hostname or "*"
        if data_endpoint[len("tcp://"):].startswith("*"):
            host = "*"
        return f"tcp://{'*' if host in _WILDCARD_HOSTS else host}:*"
    return "tcp://*:*"


def advertised_endpoint(bound: str) -> str:
    """The address trainers connect to for a socket bound at ``bound`` (its ``last_endpoint``)."""
    if not bound.startswith("tcp://"):
        return bound
    parts = urlsplit(bound)
    if parts.hostname in _WILDCARD_HOSTS or parts.hostname is None:
        return f"tcp://{socket.gethostname()}:{parts.port}"
    return bound


class ProducerSteering:
    """One steered producer's side of the loop: its feedback socket, its ledger of sent
    samples and its :class:`~edsam_online.policy.AdversarialPolicy`. Thread-safe: the
    generating thread polls and draws, the delivery thread records what it sent."""

    def __init__(self, policy: AdversarialPolicy, cfg: FeedbackConfig, session: int, *, data_endpoint: str | None,
                 curve: tuple[str, str] | None = None, max_messages: int = 256, policy_file: Path | None = None):
        self.policy, self.cfg, self.max_messages, self.policy_file = policy, cfg, max_messages, policy_file
        self.ledger = FeedbackLedger(session, cfg)
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        try:
            self.sock = self._ctx.socket(zmq.PULL)
            self.sock.linger = 0
            self.sock.rcvhwm = 64
            self.sock.maxmsgsize = 1024 + cfg.max_entries * 20
            if curve is not None:  # (own secret key file, the receivers' public key file)
                security.make_curve_client(self.sock, *curve)
            self.sock.bind(feedback_bind_endpoint(data_endpoint))
            self.endpoint = advertised_endpoint(self.sock.last_endpoint.decode())
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self.received = 0
        self._sent = np.zeros(policy.cfg.bins)  # alphas sent per bin since the last metrics()
        self._lag = [0.0, 0]  # sum of (trainer step - model step) over applied entries, their count

    def poll(self) -> int:
        """Learn from the feedback waiting on the socket (at most ``max_messages``); returns how
        many entries were applied."""
        applied = 0
        for _ in range(self.max_messages):
            try:
                data = self.sock.recv(zmq.NOBLOCK, copy=False).buffer
            except zmq.Again:
                break
            self.received += 1
            with self._lock:
                try:
                    fb = decode_feedback(data, self.cfg.max_entries)
                except FeedbackError as err:
                    self.ledger.drop(err.reason)
                    continue
                joined = self.ledger.join(fb)
                if joined is None:
                    continue
                alpha, score, loss, step = joined
                applied += self.policy.update(alpha, score, loss, step)
                self._lag[0] += float(np.sum(fb.step - step))
                self._lag[1] += len(step)
        return applied

    def save_policy(self) -> None:
        """The policy to its ``policy_file`` (:func:`edsam_online.policy.save_policy`), between
        two updates; a failed write is logged (a full disk must not stop generation)."""
        if self.policy_file is None:
            return
        try:
            with self._lock:
                save_policy(self.policy, self.policy_file)
        except OSError as err:
            log.warning("could not save the policy to %s: %s", self.policy_file, err)

    def alphas(self, n: int) -> np.ndarray | None:
        """The policy's alphas for ``n`` samples; None: draw as Eq. 9 does."""
        with self._lock:
            return self.policy.draw(n)

    def record(self, first_seq: int, alpha: np.ndarray, score: np.ndarray | None) -> None:
        """Remember samples ``first_seq ...`` (their alpha and score) for their feedback, before
        they are sent (a message that is dropped leaves its numbers to the next one)."""
        with self._lock:
            self.ledger.record(first_seq, alpha, score)

    def count_sent(self, alpha: np.ndarray) -> None:
        """Add samples that were sent to the alpha histogram (``policy/sent/*``)."""
        with self._lock:
            np.add.at(self._sent, self.policy.bin_of(np.asarray(alpha)), 1)

    def metrics(self) -> dict[str, float]:
        """``feedback/*`` (what came back, what was dropped and why, how stale it was) and
        ``policy/*``: per alpha bin, the share of the samples sent since the last call
        (``policy/sent/<bin>``, the alpha histogram over time), the draw probability (NaN
        while the policy leaves the draw to Eq. 9) and the estimated reward."""
        with self._lock:
            out = {"feedback/received": self.received, "feedback/applied": self.ledger.applied,
                   **{f"feedback/dropped/{r}": self.ledger.dropped[r] for r in DROP_REASONS},
                   "feedback/lag_steps": self._lag[0] / self._lag[1] if self._lag[1] else float("nan")}
            p = self.policy.probabilities()
            estimates = self.policy.estimates()
            sent = self._sent / max(self._sent.sum(), 1)
            self._sent[:] = 0
            for k in range(self.policy.cfg.bins):
                out[f"policy/sent/{k:02d}"] = float(sent[k])
                out[f"policy/p/{k:02d}"] = float("nan") if p is None else float(p[k])
                out[f"policy/reward/{k:02d}"] = float(estimates[k])
        return out

    def close(self) -> None:
        """Close the feedback socket and save the policy (:meth:`save_policy`)."""
        self._ctx.destroy(linger=0)
        self.save_policy()


def open_steering(stream_cfg: StreamConfig, endpoint_index: int, policy: AdversarialPolicy, cfg: FeedbackConfig,
                  session: int, name: str = "", policy_file: Path | None = None) -> ProducerSteering:
    """The steering of producer ``name`` at ``stream.endpoints[endpoint_index]``: its feedback
    socket binds beside that endpoint when the producer binds it (every interface when it
    connects), as a CURVE client under ``stream.curve``. ``policy_file``: where the policy is
    kept (:func:`~edsam_online.policy.policy_file`); one already there is loaded into
    ``policy`` first (one that does not load is named in a warning, and the policy starts afresh)."""
    if policy_file is not None and policy_file.exists():
        try:
            load_policy(policy, policy_file)
            log.info("producer %s: policy restored from %s (%d feedback entries learned before)", name, policy_file,
                     policy.applied)
        except ValueError as err:
            log.warning("producer %s: the policy starts afresh: %s", name, err)
    bound = stream_cfg.producers_bind and endpoint_index < len(stream_cfg.endpoints)
    curve = (stream_cfg.curve_client_secret, stream_cfg.curve_server_public) if stream_cfg.curve else None
    return ProducerSteering(policy, cfg, session, data_endpoint=stream_cfg.endpoints[endpoint_index] if bound else None,
                            curve=curve, policy_file=policy_file)


class FeedbackSender:
    """One trainer rank's side: collects each generated row's loss and sends it, every
    ``feedback.every_steps`` steps, to the producer that made the row (module docstring).

    ``curve``: (the receiver's secret key file, the allow-list folder) under ``stream.curve``."""

    def __init__(self, name: str, cfg: FeedbackConfig, curve: tuple[str, str] | None = None):
        self.name, self.cfg, self.curve = name, cfg, curve
        self.session = secrets.randbits(62)
        self._ctx = zmq.Context()
        self._auth = security.start_authenticator(self._ctx, curve[1]) if curve is not None else None
        self._sockets: dict[str, zmq.Socket] = {}
        self._idle: dict[str, int] = {}  # endpoint -> flushes in a row with nothing for it
        self._pending: dict[tuple[str, int], list[tuple[int, float, int]]] = {}
        self._mseq = 0
        self.sent = self.entries_sent = self.send_dropped = 0

    def add(self, endpoint: str, session: int, seq: int, loss: float, model_step: int) -> None:
        """Collect one row's report; the first report for an endpoint connects to it."""
        self._socket(endpoint)
        self._pending.setdefault((endpoint, session), []).append((seq, loss, model_step))

    def flush(self, step: int) -> None:
        """Send everything collected (never blocks: a full queue drops the message, counted).
        A socket with nothing to send for ``IDLE_FLUSHES`` flushes in a row (a producer that
        stopped or restarted elsewhere) is closed."""
        used = {endpoint for endpoint, _ in self._pending}
        for endpoint in list(self._sockets):
            self._idle[endpoint] = 0 if endpoint in used else self._idle[endpoint] + 1
            if self._idle[endpoint] >= IDLE_FLUSHES:
                self._sockets.pop(endpoint).close(linger=0)
                del self._idle[endpoint]
        for (endpoint, session), entries in self._pending.items():
            for i in range(0, len(entries), self.cfg.max_entries):
                seq, loss, model_step = (np.array(c) for c in zip(*entries[i:i + self.cfg.max_entries]))
                try:
                    data = encode_feedback(self.name, self.session, self._mseq, step, session, seq, loss,
                                           model_step)
                except ValueError:  # sample numbers 2^32 apart: the older ones are long forgotten there
                    self.send_dropped += 1
                    continue
                self._mseq += 1
                try:
                    self._socket(endpoint).send(data, zmq.NOBLOCK)
                    self.sent += 1
                    self.entries_sent += len(seq)
                except zmq.Again:
                    self.send_dropped += 1
        self._pending.clear()

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.sndhwm = self.cfg.sndhwm
            sock.immediate = True  # queue only towards a completed connection: a gone producer drops, not hoards
            if self.curve is not None:
                security.make_curve_server(sock, self.curve[0])
            sock.connect(endpoint)
            self._sockets[endpoint], self._idle[endpoint] = sock, 0
            log.info("%s: sends feedback to %s", self.name, endpoint)
        return sock

    def metrics(self) -> dict[str, float]:
        return {"feedback/messages_sent": self.sent, "feedback/entries_sent": self.entries_sent,
                "feedback/send_dropped": self.send_dropped, "feedback/producers": len(self._sockets)}

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)
