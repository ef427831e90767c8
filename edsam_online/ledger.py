"""The sample ledger: where every generated sample went, from the generator to the trainer's draws.

A producer counts every sample it generates once, at the stage where it left the stream
(``producer/*``, :data:`PRODUCER_COUNTERS`)::

    generated = filtered + sent + unsent    unsent = dropped_unsent + unsent_at_stop + over_limit

(dropped at the send; generated but not tried before the stop's grace ran out; generated past
``producer.num_samples``, never to be sent). Every trainer rank's receiver counts every sample
that reached it once (``buffer/*``, :mod:`edsam_online.streaming`), so over all producers and ranks::

    sent = accepted + dropped (by reason, in samples) + in_flight

``in_flight``: samples still queued on a receiver's socket when it stopped, taken off and counted.
A sent sample in no trainer count was lost in transit: queued in a socket of a process that ended
without passing it on (a stopping receiver takes what its socket holds first; a killed process loses
its queues). The buffer then counts what it inserted (the accepted samples), drew and drew again
(``buffer/reused``).

Each process logs its counters in its metrics JSONL; its last record carries ``ledger/final`` = 1
(:data:`FINAL_KEY`): a producer's when :meth:`~edsam_online.producer.Producer.run` ends, a trainer
rank's after its receiver stopped. A file holds every process of its rank (a restarted producer, a
resumed trainer append to it): :func:`ledger` sums each process's last record (a process ends at a
final record or where its counters fall back to 0) and names the files with a process that logged
no final record (still running, or killed). The buffer's counters continue across a resume (a
restored buffer) from its snapshot, which may be below where the process before ended (samples the
stopping receiver inserted after the checkpoint): the resumed trainer names that start in its first
record (:data:`RESTORED_PREFIX`), and each process adds only its own counts. :func:`format_ledger`
says whether both identities hold, and by how much they do not. Trainer rank 0 prints it at its end when every
producer has ended (else one line naming those still running); ``scripts/launch.sh`` prints it
after it has stopped the producers (``python -m edsam_online.ledger RUN_DIR``); ``edsam-report``
shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edsam_online.metrics import read_jsonl

FINAL_KEY = "ledger/final"
#: A producer's stages (``producer/<name>``; the keys of its ``state``).
PRODUCER_COUNTERS = ("generated", "filtered", "sent", "dropped_unsent", "unsent_at_stop", "over_limit")
#: A receiver's counts of the samples that reached it, per process: ledger name -> metric.
RECEIVER_COUNTERS = {"accepted": "buffer/accepted", "in_flight": "buffer/in_flight",
                     "dropped": "buffer/dropped_samples", "dropped_unsized": "buffer/dropped_unsized"}
#: The buffer's counts (ledger name -> metric), which a restored buffer continues.
BUFFER_COUNTERS = {"inserted": "buffer/inserts", "drawn": "buffer/samples", "reused": "buffer/reused"}
#: Prefix of the buffer counts a resumed trainer restored (``ledger/restored/buffer/inserts``, ...), in
#: its first record: its own counts start there, not at 0 nor where the process before it ended.
RESTORED_PREFIX = "ledger/restored/"
_DROPPED_PREFIX = "buffer/dropped_samples/"


@dataclass
class Ledger:
    """A run's counts, summed over its processes (:func:`ledger`)."""

    producer: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRODUCER_COUNTERS, 0))
    trainer: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*RECEIVER_COUNTERS, *BUFFER_COUNTERS], 0))
    dropped: dict[str, int] = field(default_factory=dict)  # dropped samples by reason (the ones that occurred)
    producer_processes: int = 0
    trainer_processes: int = 0
    unfinished: list[str] = field(default_factory=list)  # files with a process that logged no final record
    running: list[str] = field(default_factory=list)  # producer files whose newest process has not ended (yet)

    @property
    def unsent(self) -> int:
        return sum(self.producer[k] for k in ("dropped_unsent", "unsent_at_stop", "over_limit"))

    @property
    def generation_gap(self) -> int:
        """generated - (filtered + sent + unsent): 0 when every generated sample is counted once."""
        p = self.producer
        return p["generated"] - p["filtered"] - p["sent"] - self.unsent

    @property
    def stream_gap(self) -> int:
        """sent - (accepted + dropped + in flight): samples sent that no trainer counted (lost in
        transit; negative: counted more than sent, e.g. replayed messages or a producer's lost count)."""
        t = self.trainer
        return self.producer["sent"] - t["accepted"] - t["dropped"] - t["in_flight"]

    @property
    def balances(self) -> bool:
        """Every process ended with a final record and both identities hold exactly."""
        return (not self.unfinished and self.generation_gap == 0 and self.stream_gap == 0
                and self.trainer["dropped_unsized"] == 0)


def _processes(records: list[dict], keys: list[str]) -> list[dict]:
    """The last record of each process in one metrics file (of the records holding ``keys``)."""
    ends: list[dict] = []
    current = None
    for record in records:
        if not any(k in record for k in keys):
            continue
        if current is not None and any(record.get(k, 0) < current.get(k, 0) for k in keys):
            ends.append(current)  # the counters fell back: a new process; the old one ended unlogged
        current = None if record.get(FINAL_KEY) else record
        if current is None:
            ends.append(record)
    return ends + ([current] if current is not None else [])


def _unfinished(name: str, ends: list[dict]) -> list[str]:
    missing = sum(not end.get(FINAL_KEY) for end in ends)
    return [] if not missing else [name if len(ends) == 1 else f"{name} ({missing} of {len(ends)} processes)"]


def _increase(records: list[dict], key: str) -> int:
    """A counter's total over a file of processes that each start it at 0 or, a resumed trainer,
    at the value its first record names (``RESTORED_PREFIX + key``: its snapshot's, which may lie
    below where the process before it ended, or above a crashed one's last record)."""
    total = last = base = 0
    for record in records:
        value = int(record.get(key, last))
        restored = record.get(RESTORED_PREFIX + key)
        if restored is not None or value < last:  # a new process
            total += last - base
            base = int(restored or 0)
        last = value
    return total + last - base


def ledger(run_dir: str | Path) -> Ledger:
    """The ledger of a run folder, from ``metrics/producer*.jsonl`` and ``metrics/trainer*.jsonl``."""
    out = Ledger()
    metrics = Path(run_dir) / "metrics"
    for path in sorted(metrics.glob("producer*.jsonl")):
        ends = _processes(read_jsonl(path), [f"producer/{k}" for k in PRODUCER_COUNTERS])
        out.producer_processes += len(ends)
        out.unfinished += _unfinished(path.stem, ends)
        if ends and not ends[-1].get(FINAL_KEY):
            out.running.append(path.stem)
        for end in ends:
            for name in PRODUCER_COUNTERS:
                out.producer[name] += int(end.get(f"producer/{name}", 0))
    for path in sorted(metrics.glob("trainer*.jsonl")):
        records = read_jsonl(path)
        ends = _processes(records, list(RECEIVER_COUNTERS.values()))
        if not ends:
            continue  # no receiver: a method that streams nothing
        out.trainer_processes += len(ends)
        out.unfinished += _unfinished(path.stem, ends)
        for end in ends:
            for name, key in RECEIVER_COUNTERS.items():
                out.trainer[name] += int(end.get(key, 0))
            for key, value in end.items():
                if key.startswith(_DROPPED_PREFIX) and value:
                    reason = key[len(_DROPPED_PREFIX):]
                    out.dropped[reason] = out.dropped.get(reason, 0) + int(value)
        with_buffer = [r for r in records if "buffer/inserts" in r]
        for name, key in BUFFER_COUNTERS.items():
            out.trainer[name] += _increase(with_buffer, key)
    return out


def _check(gap: int) -> str:
    return "balances" if gap == 0 else f"does NOT balance: off by {gap:+d}"


def format_ledger(book: Ledger) -> str:
    """The ledger in a few lines: each identity with its terms and whether it balances."""
    p, t = book.producer, book.trainer
    if not book.producer_processes and not book.trainer_processes:
        return "sample ledger: no producer or receiver counts in this run"
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(book.dropped.items()))
    verdict = "balances" if book.balances else "incomplete" if book.unfinished else "does NOT balance"
    lost = book.stream_gap > 0 and not book.unfinished
    lines = [
        f"sample ledger ({book.producer_processes} producer and {book.trainer_processes} trainer processes): {verdict}",
        f"  generated {p['generated']} = filtered {p['filtered']} + sent {p['sent']} + unsent {book.unsent} "
        f"(dropped at send {p['dropped_unsent']}, left at the stop {p['unsent_at_stop']}, past num_samples "
        f"{p['over_limit']}): {_check(book.generation_gap)}",
        f"  sent {p['sent']} = accepted {t['accepted']} + dropped {t['dropped']}{f' ({dropped})' if dropped else ''} "
        f"+ in flight {t['in_flight']}: {_check(book.stream_gap)}"
        + (" (sent, in no trainer's count: lost in transit, queued in a socket when a process ended)" if lost else ""),
        f"  buffer: inserted {t['inserted']}, drawn {t['drawn']}, reused {t['reused']}",
    ]
    if t["dropped_unsized"]:
        lines.append(f"  {t['dropped_unsized']} dropped messages had no readable sample count (not in 'dropped')")
    if book.unfinished:
        lines.append(f"  no final record (still running, or killed): {', '.join(book.unfinished)}; "
                     "their last logged counts are used")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m edsam_online.ledger RUN_DIR``: print the run's ledger; exit 0 when it balances."""
    import argparse

    parser = argparse.ArgumentParser(description="The sample ledger of a run folder (module docstring).")
    parser.add_argument("run_dir")
    book = ledger(parser.parse_args(argv).run_dir)
    print(format_ledger(book))
    return 0 if book.balances else 1


if __name__ == "__main__":
    raise SystemExit(main())
