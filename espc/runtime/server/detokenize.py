"""Incremental detokenizing of a completion, and its stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class _Text:
    """Incremental detokenizing and stop strings. Each step decodes only the ids since the
    last clean boundary, with the previous step's ids as context (text-generation-inference's
    two offsets), so a long completion costs linear time. Text that may still change (an
    incomplete character) or may begin a stop string is held back until it is certain."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the context of the next step
        self.pending = ""  # decoded, not sent

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string ended the completion."""
        self.ids.append(token)
        if self.decode is None:
            return "", False
        before, after = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.pending += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def rest(self) -> tuple[str, bool]:
        """At the end: everything not sent yet (an incomplete character as U+FFFD), cut at a
        stop string if one is in it."""
        if self.decode is not None and self.read < len(self.ids):
            before, after = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
            self.pending += after[len(before):]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        hits = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = 0 if final else max((_overlap(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
