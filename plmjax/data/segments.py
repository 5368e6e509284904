"""Text -> segments: its paragraph lines, with long lines split at sentence ends."""

import re

# A sentence end: . ! or ? (maybe closing quotes/brackets), spaces, then what can start one.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
# Lines up to this long stay one segment; longer ones are split at sentence ends.
LONG_LINE_CHARS = 200


def split_sentences(line: str) -> list[str]:
  line = line.strip()
  if len(line) <= LONG_LINE_CHARS:
    return [line] if line else []
  return [s.strip() for s in _SENTENCE_END.sub(r"\1\n", line).split("\n") if s.strip()]


def text_to_segments(text: str) -> list[str]:
  return [s for line in text.split("\n") for s in split_sentences(line)]
