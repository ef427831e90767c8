"""``buffer-monitor``: print a running trainer's live replay-buffer state.

Two sources:

* ``--endpoint tcp://host:port``: ask a receiver's stats endpoint
  (``stream.stats_endpoint``) for a fresh snapshot (ZeroMQ REQ/REP, msgpack; under CURVE
  with ``--curve-client-secret`` and ``--curve-server-public``);
* ``--jsonl FILE`` or ``--run-dir DIR``: the latest ``buffer/*`` record in a
  trainer's metrics JSONL (``DIR/metrics/trainer*.jsonl``), what
  :class:`edsam_online.metrics.MetricLogger` writes.

``--once`` prints one snapshot; otherwise it refreshes every ``--interval`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
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


def read_latest(path: str | Path) -> dict[str, Any]:
    """The last record of a metrics JSONL that holds ``buffer/*`` keys (empty if none yet)."""
    latest: dict[str, Any] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if isinstance(record, dict) and any(k.startswith("buffer/") for k in record):
                latest = record
    return latest


def format_stats(stats: dict[str, Any], title: str = "") -> str:
    """A compact human-readable view of one snapshot."""

    def g(key: str, default: float = 0.0) -> float:
        value = stats.get(key, default)
        return value if isinstance(value, (int, float)) else default

    lines = [title] if title else []
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


def _snapshots(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if args.endpoint:
        return [(e, fetch_stats(e, args.timeout, curve_client_secret=args.curve_client_secret,
                                curve_server_public=args.curve_server_public)) for e in args.endpoint]
    paths = [Path(p) for p in args.jsonl]
    if args.run_dir:
        paths += sorted(Path(args.run_dir, "metrics").glob("trainer*.jsonl"))
    if not paths:
        raise SystemExit("buffer-monitor: no trainer*.jsonl found (is --run-dir right?)")
    return [(str(p), read_latest(p)) for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="buffer-monitor", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoint", action="append", help="receiver stats endpoint (repeatable)")
    source.add_argument("--jsonl", action="append", default=[], help="trainer metrics JSONL (repeatable)")
    source.add_argument("--run-dir", help="run folder: reads metrics/trainer*.jsonl")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an endpoint")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--curve-client-secret", default="", metavar="FILE",
                        help="--endpoint under CURVE: a key pair on the receivers' allow-list (.key_secret)")
    parser.add_argument("--curve-server-public", default="", metavar="FILE", help="... and the receiver's public key")
    parser.add_argument("--json", action="store_true", help="print raw JSON instead of the summary")
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.timeout <= 0:
        parser.error("--interval and --timeout must be > 0")
    try:
        while True:
            try:
                snapshots = _snapshots(args)
            except (TimeoutError, OSError) as err:
                print(f"buffer-monitor: {err}", file=sys.stderr)
                if args.once:
                    return 1
                snapshots = []
            for name, stats in snapshots:
                if args.json:
                    print(json.dumps({"source": name, **stats}), flush=True)
                else:
                    print(format_stats(stats, title=f"== {name} @ {time.strftime('%H:%M:%S')}") + "\n", flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
