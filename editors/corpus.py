"""The shipped text corpus: WikiText-2 (test split, raw), cut at an article boundary.

The first ~80 % of the articles feed the covariance statistics of the editors; the rest is
held out for perplexity (evaluators and the agent's probes read it from here), so perplexity
is never measured on text the statistics have seen. The file ships in editors/data/ (see its
ATTRIBUTION.md) and is read from the installed package (importlib.resources), never from the cwd.
"""
from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable

CORPUS_FILE = "wikitext2-test.raw"
STATS_FRACTION = 0.8  # share of the corpus (in characters, rounded to an article) used for statistics
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # level-1 headings start articles


def data_path(name: str) -> Traversable:
    """A file shipped in editors/data/."""
    return files("editors") / "data" / name


def corpus_bytes() -> bytes:
    return data_path(CORPUS_FILE).read_bytes()


def corpus_text() -> str:
    """The whole corpus with line endings normalised to '\\n'."""
    return corpus_bytes().decode("utf-8").replace("\r\n", "\n")


def article_starts(text: str) -> list[int]:
    """Character offsets where articles begin (the line of each level-1 heading)."""
    return [m.start() for m in _ARTICLE_HEADING.finditer(text)]


def split_offset(text: str, fraction: float = STATS_FRACTION) -> int:
    """The article boundary closest to `fraction` of the text (never 0 or the end)."""
    target = fraction * len(text)
    inner = [s for s in article_starts(text) if 0 < s < len(text)]
    if not inner:
        raise ValueError("the corpus has no article boundary to split at")
    return min(inner, key=lambda s: abs(s - target))


def stats_text() -> str:
    """The first ~80 % of the corpus: the text covariance statistics are computed on."""
    text = corpus_text()
    return text[: split_offset(text)]


def heldout_text() -> str:
    """The remaining ~20 %: held-out text for perplexity."""
    text = corpus_text()
    return text[split_offset(text):]


def corpus_hash() -> str:
    """A short hash of the shipped corpus file and the split, to key cached statistics."""
    h = hashlib.sha256(corpus_bytes())
    h.update(f"split={STATS_FRACTION}".encode())
    return h.hexdigest()[:16]
