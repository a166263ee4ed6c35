"""Stop strings over streamed text: a stop string may span any number of tokens.

Text that could still be the start of a stop string is held back until the next piece decides
it; the stop string itself and everything after it are never emitted (OpenAI's behaviour).

    stops ["\\n\\n"], pieces "Hi\\n", "\\nthere" -> emits "Hi", then "" and stops
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self._held = ""  # emitted nowhere yet: a possible beginning of a stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return what is now certainly output (empty once a stop string appeared)."""
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = self._partial_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held text, when generation ended without a stop string."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
