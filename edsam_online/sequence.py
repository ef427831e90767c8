"""Per-session sequence tracking of a receiver: gaps, duplicates, out-of-window jumps, resyncs.

Pure bookkeeping (no sockets, no clock), so that what a peer's sequence numbers can do to a
stream is testable on its own (:mod:`edsam_online.streaming` has the rules in prose). A
message of a producer session carries the sequence number of its first sample and ``k``
samples; the session's high-water mark is the last sample number accepted.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """What one message does to its session: ``refused`` (``"duplicate"``,
    ``"seq_out_of_window"``, or None: accepted), and for an accepted message the sample
    numbers skipped since the mark (``gaps``), whether it opened a new session and whether it
    re-anchored a session after ``resync_after`` refusals (no gap is counted across that).
    ``mark`` is the session's high-water mark before the message (None for a new session)."""

    refused: str | None
    gaps: int = 0
    new_session: bool = False
    resynced: bool = False
    mark: int | None = None


class SequenceTracker:
    """High-water marks of up to ``max_sessions`` producer sessions (the oldest forgotten first).

    A sequence number at or below a session's mark is a duplicate; more than ``window`` past it
    is out of window; both are refused without moving the mark. After ``resync_after``
    consecutive refusals the session re-anchors on its next message, so a peer that pushed the
    mark ahead costs the stream at most that many messages."""

    def __init__(self, window: int, resync_after: int, max_sessions: int = 4096) -> None:
        self.window, self.resync_after, self.max_sessions = window, resync_after, max_sessions
        # session key -> [high-water mark, consecutive refused messages]
        self._marks: collections.OrderedDict[object, list[int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._marks)

    def observe(self, key: object, seq: int, k: int) -> Verdict:
        """Judge a message of ``k`` samples numbered from ``seq`` in session ``key`` and, unless
        it is refused, move the session's mark to its last sample."""
        tracker = self._marks.get(key)
        mark = None if tracker is None else tracker[0]
        if tracker is not None and tracker[1] < self.resync_after:
            refused = "duplicate" if seq <= mark else "seq_out_of_window" if seq - mark > self.window else None
            if refused is not None:
                tracker[1] += 1
                return Verdict(refused, mark=mark)
        if tracker is None:
            if len(self._marks) >= self.max_sessions:
                self._marks.popitem(last=False)
            verdict = Verdict(None, new_session=True)
        elif tracker[1] >= self.resync_after:
            verdict = Verdict(None, resynced=True, mark=mark)
        else:
            verdict = Verdict(None, gaps=seq - mark - 1, mark=mark)
        self._marks[key] = [seq + k - 1, 0]
        self._marks.move_to_end(key)
        return verdict
