"""``buffer-monitor``: print a running trainer's live replay-buffer state.

Two sources:

* ``--endpoint tcp://host:port``: ask a receiver's stats endpoint
  (``stream.stats_endpoint``) for a fresh snapshot (ZeroMQ REQ/REP, msgpack; under CURVE
  with ``--curve-client-secret`` and ``--curve-server-public``);
* ``--jsonl FILE`` or ``--run-dir DIR``: the latest ``buffer/*`` record in a
  trainer's metrics JSONL (``DIR/metrics/trainer*.jsonl``), what
  :class:`edsam_online.metrics.MetricLogger` writes.

``--once`` prints one snapshot; otherwise it refreshes every ``--interval`` seconds until the
run has finished: every trainer JSONL holds a record at the run's last step (``trainer.stop_at``,
else ``trainer.steps``, from the run folder's ``hydra/config.yaml``; the trainer logs there after
its last step, before its final checkpoint and evaluation, and no later record carries
``buffer/*``). Then it prints a final line and exits 0. A run that ends otherwise (a stop signal,
a crash) writes no such record; ``--idle-exit S`` ends the watch once S seconds pass without a
new record (or, with ``--endpoint``, without an answer). Each snapshot is titled with the
trainer step of its record; a run whose trainers keep no buffer (a method that streams nothing,
e.g. ``method=none``) prints ``no buffer (method=...)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic, sleep, strftime
from typing import Any

import msgpack
import zmq

from edsam_online import security


def fetch_stats(endpoint: str, timeout_s: float = 2.0, ctx: zmq.Context | None = None,
                curve_client_secret: str = "", curve_server_public: str = "") -> dict[str, Any]:
    """One snapshot from a receiver's stats endpoint; TimeoutError if nobody answers. A stream
    under CURVE needs a key pair on the receivers' allow-list and the receiver's public key."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    if curve_client_secret or curve_server_public:
        security.make_curve_client(sock, curve_client_secret, curve_server_public)
    sock.rcvtimeo = int(timeout_s * 1000)
    sock.maxmsgsize = 1 << 20
    try:
        sock.connect(endpoint)
        sock.send(b"stats")
        try:
            return msgpack.unpackb(sock.recv(), raw=False)
        except zmq.Again:
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s}s") from None
    finally:
        sock.close()


@dataclass
class TrainerLog:
    """What a trainer's metrics JSONL holds so far: how many records, the last one's step, and
    the last record holding ``buffer/*`` keys (empty if none)."""

    records: int = 0
    step: int | None = None
    buffer: dict[str, Any] = field(default_factory=dict)


def read_log(path: str | Path) -> TrainerLog:
    """Read a trainer's metrics JSONL (a line being written is skipped)."""
    out = TrainerLog()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            out.records += 1
            if isinstance(record.get("step"), int):
                out.step = record["step"]
            if any(k.startswith("buffer/") for k in record):
                out.buffer = record
    return out


def read_latest(path: str | Path) -> dict[str, Any]:
    """The last record of a metrics JSONL that holds ``buffer/*`` keys (empty if none yet)."""
    return read_log(path).buffer


@dataclass
class RunInfo:
    """From a run folder's ``hydra/config.yaml``: the step its trainers stop after, its method."""

    end: int | None = None
    method: str | None = None


def read_run_info(run_dir: str | Path) -> RunInfo:
    """:class:`RunInfo` of ``run_dir`` (fields None where the config is missing or lacks them)."""
    path = Path(run_dir, "hydra", "config.yaml")
    if not path.is_file():
        return RunInfo()
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    steps, stop_at = OmegaConf.select(cfg, "trainer.steps"), OmegaConf.select(cfg, "trainer.stop_at") or 0
    end = min(stop_at or steps, steps) if isinstance(steps, int) and isinstance(stop_at, int) else None
    method = OmegaConf.select(cfg, "method.name")
    return RunInfo(end, method if isinstance(method, str) else None)


def format_stats(stats: dict[str, Any], title: str = "", method: str | None = None) -> str:
    """A compact human-readable view of one snapshot; one without ``buffer/*`` keys is a
    trainer that keeps no buffer (``method``: the run's, where known)."""

    def g(key: str, default: float = 0.0) -> float:
        value = stats.get(key, default)
        return value if isinstance(value, (int, float)) else default

    lines = [title] if title else []
    if not any(k.startswith("buffer/") for k in stats):
        lines.append(f"no buffer (method={method or 'unknown'})")
        return "\n".join(lines)
    lines.append(
        f"size {int(g('buffer/size'))}/{int(g('buffer/capacity'))} ({100 * g('buffer/fill'):.0f}%)  "
        f"inserts/s {g('buffer/inserts_per_s'):.1f}  samples/s {g('buffer/samples_per_s'):.1f}  "
        f"samples/insert {g('buffer/samples_per_insert'):.2f}"
    )
    lines.append(
        f"inserts {int(g('buffer/inserts'))}  samples {int(g('buffer/samples'))}  "
        f"starved {int(g('buffer/starved'))} (min_size {int(g('buffer/starved_min_size'))}, "
        f"rate {int(g('buffer/starved_rate_limited'))})  evicted {int(g('buffer/evicted'))} "
        f"(never sampled {int(g('buffer/evicted_never_sampled'))})  retired {int(g('buffer/retired'))}"
    )
    lines.append(
        f"sample age: {g('buffer/sample_age_s_mean'):.2f}s mean, {g('buffer/sample_age_s_max'):.2f}s max, "
        f"{g('buffer/sample_age_steps_mean'):.1f} steps mean  latency {1000 * g('buffer/latency_s'):.1f} ms"
    )
    hist = [(k.rsplit("/", 1)[1], int(v)) for k, v in stats.items() if k.startswith("buffer/reuse_hist/")]
    if hist:
        lines.append("reuse histogram (uses: items): " + "  ".join(f"{b}: {n}" for b, n in hist))
    lines.append(
        f"received {int(g('buffer/received'))}  accepted {int(g('buffer/accepted'))}  "
        f"dropped {int(g('buffer/dropped'))}  seq gaps {int(g('buffer/seq_gaps'))}  "
        f"peers +{int(g('buffer/peer_connects'))}/-{int(g('buffer/peer_disconnects'))}  "
        f"auth failures {int(g('buffer/auth_failures'))}"
    )
    drops = {k.split("/", 2)[2]: int(v) for k, v in stats.items() if k.startswith("buffer/dropped/") and v}
    if drops:
        lines.append("dropped by reason: " + "  ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    producer = {k: v for k, v in stats.items() if k.startswith("producer/") and isinstance(v, (int, float))}
    if producer:
        lines.append(
            f"producers {int(g('producer/active'))}: samples/s {g('producer/samples_per_s'):.1f}  "
            f"unet calls/s {g('producer/unet_calls_per_s'):.1f}  send blocked {g('producer/send_blocked_s'):.1f}s"
        )
    return "\n".join(lines)


@dataclass
class Snapshot:
    """One source's state: its name, its stats, the trainer step they are from (None: unknown)
    and its log's record count (None for an endpoint)."""

    name: str
    stats: dict[str, Any]
    step: int | None = None
    records: int | None = None


def _snapshots(args: argparse.Namespace) -> list[Snapshot]:
    if args.endpoint:
        return [Snapshot(e, fetch_stats(e, args.timeout, curve_client_secret=args.curve_client_secret,
                                        curve_server_public=args.curve_server_public)) for e in args.endpoint]
    out = []
    for path in _jsonl_paths(args):
        trainer_log = read_log(path)
        out.append(Snapshot(str(path), trainer_log.buffer, trainer_log.step, trainer_log.records))
    return out


def _jsonl_paths(args: argparse.Namespace) -> list[Path]:
    paths = [Path(p) for p in args.jsonl]
    if args.run_dir:
        paths += sorted(Path(args.run_dir, "metrics").glob("trainer*.jsonl"))
    if not paths:
        raise SystemExit("buffer-monitor: no trainer*.jsonl found (is --run-dir right?)")
    return paths


def _run_dir(args: argparse.Namespace) -> Path | None:
    """The run folder: ``--run-dir``, or the one a ``--jsonl`` file sits in (``<run>/metrics/``)."""
    if args.run_dir:
        return Path(args.run_dir)
    if args.jsonl and Path(args.jsonl[0]).parent.name == "metrics":
        return Path(args.jsonl[0]).parent.parent
    return None


def _title(snapshot: Snapshot, end: int | None) -> str:
    step = "" if snapshot.step is None else f"  step {snapshot.step}" + ("" if end is None else f"/{end}")
    return f"== {snapshot.name}{step} @ {strftime('%H:%M:%S')}"


def _finished(snapshots: list[Snapshot], end: int | None) -> bool:
    """Every trainer log holds a record at the run's last step."""
    return end is not None and bool(snapshots) and all(s.step is not None and s.step >= end for s in snapshots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="buffer-monitor", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoint", action="append", help="receiver stats endpoint (repeatable)")
    source.add_argument("--jsonl", action="append", default=[], help="trainer metrics JSONL (repeatable)")
    source.add_argument("--run-dir", help="run folder: reads metrics/trainer*.jsonl")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an endpoint")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="S",
                        help="exit 0 after S seconds without a new record or an endpoint's answer (0: never)")
    parser.add_argument("--curve-client-secret", default="", metavar="FILE",
                        help="--endpoint under CURVE: a key pair on the receivers' allow-list (.key_secret)")
    parser.add_argument("--curve-server-public", default="", metavar="FILE", help="... and the receiver's public key")
    parser.add_argument("--json", action="store_true", help="print raw JSON instead of the summary")
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.timeout <= 0:
        parser.error("--interval and --timeout must be > 0")
    if args.idle_exit < 0:
        parser.error("--idle-exit must be >= 0 (0: never)")
    status = sys.stderr if args.json else sys.stdout  # --json keeps stdout to JSON lines
    run_dir = _run_dir(args)
    info = read_run_info(run_dir) if run_dir is not None else RunInfo()
    seen: list[int | None] | None = None  # each log's record count at the previous poll
    active = monotonic()  # when a new record or an answer last came
    try:
        while True:
            try:
                snapshots = _snapshots(args)
            except (TimeoutError, OSError) as err:
                print(f"buffer-monitor: {err}", file=sys.stderr)
                if args.once:
                    return 1
                snapshots = []
            counts = [s.records for s in snapshots]
            if snapshots and (args.endpoint or counts != seen):
                active, seen = monotonic(), counts
            for snap in snapshots:
                if args.json:
                    print(json.dumps({"source": snap.name, **snap.stats, "trainer/step": snap.step}), flush=True)
                elif snap.records == 0:
                    print(f"{_title(snap, info.end)}\nno trainer record yet\n", flush=True)
                else:
                    print(format_stats(snap.stats, _title(snap, info.end), info.method) + "\n", flush=True)
            if args.once:
                return 0
            if _finished(snapshots, info.end):
                print(f"buffer-monitor: the run finished: its trainers logged step {info.end}, the last "
                      "(trainer.steps / trainer.stop_at); no newer buffer state will come", file=status, flush=True)
                return 0
            if args.idle_exit and monotonic() - active >= args.idle_exit:
                print(f"buffer-monitor: nothing new for {args.idle_exit:g} s (--idle-exit); the run looks stopped "
                      "(the last snapshot is above)", file=status, flush=True)
                return 0
            sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
