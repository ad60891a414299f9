"""Turning a stream of token bytes into text pieces: UTF-8 reassembly and stop strings.

Pure and incremental, so a token costs O(its own length) however long the output is.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """Withholds text that may be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return the part now safe to emit."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = _longest_partial_suffix(buf, self.stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation, the withheld text was not a stop after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _longest_partial_suffix(buf: str, stops: list[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of some stop."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(buf)), best, -1):
            if buf.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Bytes of tokens in, text pieces out, honouring stop strings."""

    def __init__(self, stops: list[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, piece: bytes) -> str:
        return self._stops.feed(self._decoder.decode(piece))

    def flush(self) -> str:
        tail = self._stops.feed(self._decoder.decode(b"", final=True))
        return tail + self._stops.flush()
