"""The one place where text that gradscope did not write is made safe for a terminal.

Layer names, class names, finding messages, notes and evidence can come from
model code or from a report JSON someone else wrote.  A string holding an
escape sequence (``ESC [ 2 J`` clears the screen, ``ESC ] 8`` makes a hidden
hyperlink, ``ESC ] 52`` writes the clipboard) would act on the user's terminal
when a report is printed, and bidirectional override characters can make a
line read differently from what it says (Boucher & Anderson 2021, "Trojan
Source", CVE-2021-42574).  ``clean_text`` removes them; ``clean_tree`` applies
it to every string of a report before the console and Markdown renderers see
it; ``escape_json_controls`` makes a JSON document terminal-safe without
changing the data it holds.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from enum import Enum
from typing import Any, TypeVar, cast

T = TypeVar("T")

# ECMA-48 control sequences: CSI (ESC [ params intermediates final), OSC and the
# other string commands (DCS, SOS, PM, APC) up to BEL or ST, and two-byte escapes.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI ... final byte (7-bit ESC [ or the 8-bit C1 CSI)
    r"|\x9d[^\x07\x9c]*(?:\x07|\x9c)?"  # 8-bit OSC ... BEL or ST
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC / DCS / SOS / PM / APC ... BEL or ST
    r"|\x1b[ -~]"  # two-byte escapes (ESC c resets the terminal)
)
# What remains dangerous once sequences are gone: every C0 control but tab and
# newline (CR rewrites the line, BS erases), DEL, the C1 controls (U+009B is a
# one-character CSI on some terminals) and the bidirectional formatting characters.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# In JSON text the C0 controls are already escaped by ``json.dumps``; these are
# the ones it leaves raw.
_JSON_RAW_CONTROL = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str) -> str:
    """``text`` without escape sequences and control characters (tab and newline stay)."""
    if text.isprintable():  # the common case: nothing to do
        return text
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text))


def escape_json_controls(document: str) -> str:
    r"""A JSON document with DEL, the C1 controls and the bidi characters written as ``\uXXXX``.

    Lossless: the parsed data is the same.  Outside strings JSON has only ASCII
    punctuation, so every such character is inside a string, where an escape is valid.
    """
    return _JSON_RAW_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", document)


def clean_tree(value: T) -> T:
    """``value`` with every string in it cleaned: dicts, lists, tuples and dataclass
    instances (a Report, its Record, layers, findings and fixes) are copied only
    where something changed; other objects (tensors, statistics) are shared."""
    return _clean(value, 0)


_MAX_DEPTH = 32  # a report is a few levels deep; anything deeper is left as it is


def _clean(value: Any, depth: int) -> Any:
    if type(value) is str:  # not str subclasses: enums such as Severity keep their type
        return clean_text(value)
    if depth > _MAX_DEPTH or isinstance(value, (Enum, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        items = [(_clean(k, depth + 1), _clean(v, depth + 1)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        out: Any = copy.copy(cast(Any, value))
        out.clear()
        out.update(items)
        return out
    if isinstance(value, (list, tuple)):
        cleaned = [_clean(v, depth + 1) for v in value]
        if all(c is v for c, v in zip(cleaned, value, strict=True)):
            return value
        return type(value)(cleaned) if type(value) in (list, tuple) else cleaned
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in dataclasses.fields(value):
            old = getattr(value, f.name, None)
            new = _clean(old, depth + 1)
            if new is not old:
                changed[f.name] = new
        if not changed:
            return value
        out = copy.copy(value)
        for name, new in changed.items():
            object.__setattr__(out, name, new)
        return out
    return value
