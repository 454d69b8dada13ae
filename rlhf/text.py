"""Text normalization shared by world generation, splitting, leakage checks and deduplication: one key
for "the same prompt" everywhere."""

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-folded, NFKC, whitespace collapsed: two prompts equal under this are the same prompt."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
