"""Text hygiene of feed records: the characters refused at intake, the normalisation applied, and safe display.

Refused in every string field of a feed line (the line is a bad line naming the field, the character and where):

- control characters (Unicode category Cc: the C0 range with NUL, DEL, the C1 range) other than tab, newline and
  carriage return, which are ordinary whitespace in real data (CounterFact's paraphrases hold newlines);
- bidirectional embeddings, overrides and isolates, U+202A-U+202E and U+2066-U+2069: they reorder how the text
  around them is displayed, so a terminal or a web page would show something other than what the model is taught;
- the line and paragraph separators U+2028 and U+2029, and lone surrogates (not encodable text);
- a non-blank string made only of invisible characters (zero-width spaces, joiners, directional marks, ...).

Normalised in the texts the model reads (subject, prompt, target, old_target, paraphrases, neighbours): Unicode NFC,
each run of tabs, newlines and carriage returns becomes one space, and the directional marks U+200E, U+200F and
U+061C are removed. The marks are invisible, mean nothing to the model, and
a subject carrying one would be a different string from the same subject without it, slipping past deduplication.
`id` and `source` are checked but kept as sent.

`shown(text)` is how stored text reaches a terminal or the HTML report: every character that is invisible or moves
other text (controls, format characters but the zero-width joiners, separators, surrogates, private-use and
unassigned code points) is written as a visible escape such as `\\u202e`, for facts stored before these checks too.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any

REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
MARKS = re.compile("[\u200e\u200f\u061c]")
BREAKS = re.compile("[\t\n\r]+")  # whitespace controls: one space each run in model texts
MODEL_TEXT = ("subject", "prompt", "target", "old_target")  # normalised; `id` and `source` are only checked
KEPT_AS_SENT = ("id", "source")
INVISIBLE = {"Cc", "Cf", "Cs", "Zl", "Zp", "Zs", "Mn", "Me"}  # categories with nothing to see on their own
ESCAPED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # categories `shown` escapes
JOINERS = {"\u200c", "\u200d"}  # zero-width (non-)joiners: needed by some scripts and emoji, and move nothing


def _what(char: str) -> tuple[str, str]:
    """What a refused character is, and (if not obvious) why it is refused."""
    if "\u202a" <= char <= "\u202e" or "\u2066" <= char <= "\u2069":
        return "a bidirectional override or isolate", " (it reorders how text is displayed)"
    if "\ud800" <= char <= "\udfff":
        return "a lone surrogate", " (not text)"
    if char in "\u2028\u2029":
        return "a line or paragraph separator", ""
    return "a control character", ""


def text_problem(text: str) -> str | None:
    """Why `text` is refused (one line), or None."""
    if text.isascii() and text.isprintable():  # the common case: nothing refused, something visible or blank
        return None
    bad = REFUSED.search(text)
    if bad:
        what, why = _what(bad.group())
        return f"contains {what} U+{ord(bad.group()):04X} at character {bad.start() + 1}{why}"
    if text.strip() and not any(unicodedata.category(c) not in INVISIBLE for c in MARKS.sub("", text)):
        return "has only invisible characters (zero-width or format characters, directional marks)"
    return None


def normalised(text: str) -> str:
    """NFC, tabs and line breaks as one space, without the directional marks."""
    if text.isascii() and text.isprintable():  # no marks, no breaks, and ASCII is already NFC
        return text
    return unicodedata.normalize("NFC", BREAKS.sub(" ", MARKS.sub("", text)))


def _strings(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, value) of every string in the record's known fields, as pydantic names them."""
    out = [(name, data[name]) for name in MODEL_TEXT + KEPT_AS_SENT if isinstance(data.get(name), str)]
    for name in ("paraphrases", "aliases"):
        items = data.get(name)
        if isinstance(items, list):
            out += [(f"{name}.{i}", p) for i, p in enumerate(items) if isinstance(p, str)]
    neighbors = data.get("neighbors")
    if isinstance(neighbors, list):
        for i, n in enumerate(neighbors):
            if isinstance(n, dict):
                out += [(f"neighbors.{i}.{k}", n[k]) for k in ("prompt", "target") if isinstance(n.get(k), str)]
    return out


def record_problem(data: dict[str, Any]) -> tuple[str, str] | None:
    """(field, reason) of the first refused string of a feed object's known fields, or None."""
    for path, value in _strings(data):
        reason = text_problem(value)
        if reason:
            return path, reason
    return None


def normalise_record(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a feed object with its model texts normalised (strings only; other values are left to the schema)."""
    out = dict(data)
    for name in MODEL_TEXT:
        if isinstance(out.get(name), str):
            out[name] = normalised(out[name])
    for name in ("paraphrases", "aliases"):
        if isinstance(out.get(name), list):
            out[name] = [normalised(p) if isinstance(p, str) else p for p in out[name]]
    if isinstance(out.get("neighbors"), list):
        out["neighbors"] = [{k: normalised(v) if k in ("prompt", "target") and isinstance(v, str) else v
                             for k, v in n.items()} if isinstance(n, dict) else n for n in out["neighbors"]]
    return out


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def shown(text: str | None) -> str:
    """`text` safe to print: invisible and text-moving characters escaped visibly (see the module docstring)."""
    if text is None:
        return ""
    if text.isascii():
        return text if text.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in text)
    return "".join(_escape(c) if unicodedata.category(c) in ESCAPED and c not in JOINERS else c for c in text)
