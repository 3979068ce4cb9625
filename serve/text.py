"""Turning a row's tokens into text as they come: whole characters only, and stop strings honoured.

The text is the decode of every token so far (so a tokenizer that merges spaces or bytes across
tokens is decoded as a whole); what is emitted is the part that can no longer change: not a
trailing incomplete character (U+FFFD) and not a tail that may still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The emitted text of one row. ``push(token)`` returns the new text that may be sent."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.sent = ""  # what the client has received
        self.stopped = False  # a stop string was found: the row is done

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self._text()
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at != -1:
                self.stopped = True
                return self._advance(text[:at])
        keep = len(text)
        while keep > len(self.sent) and text[keep - 1] == "\ufffd":  # an unfinished multi-byte character
            keep -= 1
        keep -= self._held_back(text[:keep])
        return self._advance(text[:keep])

    def finish(self) -> str:
        """The rest of the text once the row ends (the held-back tail, complete or not)."""
        if self.stopped:
            return ""
        return self._advance(self._text())

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts a stop string (it may still complete)."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""  # a decode that rewrote earlier text (rare): wait until it extends what was sent
        new = text[len(self.sent) :]
        self.sent = text
        return new
