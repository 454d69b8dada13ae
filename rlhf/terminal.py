"""Untrusted text on its way to a terminal: control characters and escape sequences made visible.

Prompts, responses, ids and file contents come from outside (data files, model samples). Written to a
terminal as they are, an ANSI escape sequence (`ESC [31m`), a carriage return or a bidirectional
override can recolor, hide or rewrite what a labeler reads. `visible` spells each such character out
as Python does (`\\x1b`, `\\r`, `\\u202e`) and keeps newlines and tabs, so the text reads as what it is.
The labeler, stage summaries and every error line go through it.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline; DEL; C1 controls (0x9b is the 8-bit CSI that starts an escape
# sequence on some terminals); zero-width space and BOM; the Unicode bidirectional controls and
# line/paragraph separators that reorder or break what is shown (Boucher & Anderson 2021, "Trojan Source").
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def _spell(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r":
        return "\\r"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, one_line: bool = False) -> str:
    """`text` with every control character or escape sequence introducer written out, e.g. `\\x1b[31m`.

    `one_line` also writes out newlines and tabs (`\\n`), for messages that must stay one line.
    """
    text = _UNSAFE.sub(_spell, text)
    return text.replace("\t", "\\t").replace("\n", "\\n") if one_line else text
