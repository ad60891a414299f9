"""Turning a stream of token bytes into text pieces: UTF-8 reassembly and stop strings.

Pure and incremental, so a token costs O(its own length) however long the output is.
"""

from __future__ import annotations

import codecs
from collections import deque


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
    """Token bytes in, text pieces out, honouring stop strings; each piece ends on a token boundary.

    `feed` returns the text now safe to emit and how many tokens it completes: a piece is
    the exact text of those tokens, never part of one. So the ids sent with a piece are
    the answer so far, token for token, and a failover continues from them exactly. Text
    is only held back where a character spans two tokens or a token holds the start of
    a stop string, until the token that completes it.
    """

    def __init__(self, stops: list[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)
        self._tokens = 0  # tokens fed
        self._decoded = 0  # characters decoded from them
        self._released = 0  # ... of which the stop matcher let through
        self._unsent = ""  # released text past the last token boundary it reaches
        self._boundaries: deque[tuple[int, int]] = deque()  # (characters, tokens) where a token's text ends

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, piece: bytes) -> tuple[str, int]:
        """Add one token; return the text to emit now and the tokens that text completes."""
        self._tokens += 1
        text = self._decoder.decode(piece)
        self._decoded += len(text)
        if not self._decoder.getstate()[0]:  # no partial character pending: a token boundary
            self._boundaries.append((self._decoded, self._tokens))
        released = self._stops.feed(text)
        self._released += len(released)
        self._unsent += released
        chars, tokens = 0, 0
        while self._boundaries and self._boundaries[0][0] <= self._released:
            chars, tokens = self._boundaries.popleft()
        if not tokens:
            return "", 0
        cut = len(self._unsent) - (self._released - chars)
        out, self._unsent = self._unsent[:cut], self._unsent[cut:]
        return out, tokens

    def flush(self) -> str:
        """The end: everything still held that is not a stop string."""
        tail = self._stops.feed(self._decoder.decode(b"", final=True)) + self._stops.flush()
        out, self._unsent = self._unsent + tail, ""
        self._boundaries.clear()
        return out
