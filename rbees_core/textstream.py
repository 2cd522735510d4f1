"""Turns a stream of token bytes into text pieces that are safe to send.

Two rules: a piece holds only whole UTF-8 characters (bytes of a split character wait for
the rest), and text that might be the start of a stop sequence is held back until it is
known not to be one; when a stop sequence appears, the text before it is the last piece.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add the bytes of one token; return the text that may be sent now (maybe empty)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        if not self._stops:
            self._held = ""
            return text
        cut = self._first_stop(text)
        if cut >= 0:
            pending = self._partial_before(text, cut)
            if pending is None:
                self.stopped = True
                self._held = ""
                return text[:cut]
            # a longer stop may still begin before this one: wait for the tokens that decide
            self._held = text[pending:]
            return text[:pending]
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: whatever is held back. The bytes of a character that the last
        token left unfinished (``max_tokens`` cut it) are dropped, not sent as U+FFFD: a
        piece holds only whole characters."""
        if self.stopped:
            return ""
        text = self._held
        self._decoder.reset()
        self._held = ""
        cut = self._first_stop(text)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _first_stop(self, text: str) -> int:
        """Where the earliest stop sequence in ``text`` begins; -1 if none is there."""
        return min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)

    def _partial_before(self, text: str, cut: int) -> int | None:
        """The first position before ``cut`` where ``text`` ends with the unfinished start of
        a stop sequence, or None: only then is the stop at ``cut`` not yet the earliest."""
        longest = max(len(s) for s in self._stops)
        for q in range(max(0, len(text) - longest + 1), cut):
            tail = text[q:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return q
        return None
