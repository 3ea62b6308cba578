"""A user-supplied statistics corpus (`--stats-corpus FILE|DIR`): plain text or JSON Lines, read as a stream.

The shipped ~1 MB of WikiText-2 is thin for an 8B model's covariance; a user can point kagent at their own text.
A FILE or every file under a DIR (sorted, recursively) is read: `.jsonl` files one JSON object per line (its
"text" field, else its first string value), anything else as UTF-8 text. Nothing is held whole: `digest` hashes
the bytes in chunks with a progress bar (the statistics cache is keyed by it, so a changed corpus means new
statistics and an unchanged one is never tokenised again) and `token_ids` tokenises document by document until
it has the tokens asked for.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

CHUNK = 1 << 20  # bytes hashed per read


class CorpusError(ValueError):
    """The statistics corpus is missing, empty or unreadable."""


@dataclass(frozen=True)
class UserCorpus:
    path: Path

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise CorpusError(f"--stats-corpus {self.path}: no such file or directory")
        found = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise CorpusError(f"--stats-corpus {self.path}: the directory holds no files")
        return found

    def digest(self) -> str:
        """A short content hash of every file (names relative to the corpus root, then bytes)."""
        files = self.files()
        h = hashlib.sha256()
        with tqdm(total=sum(f.stat().st_size for f in files), desc="hashing stats corpus", unit="B",
                  unit_scale=True, leave=False) as bar:
            for f in files:
                h.update(str(f.relative_to(self.path) if f != self.path else f.name).encode())
                with f.open("rb") as fh:
                    while block := fh.read(CHUNK):
                        h.update(block)
                        bar.update(len(block))
        return "u" + h.hexdigest()[:15]

    def texts(self) -> Iterator[str]:
        """Documents in order: JSONL rows' text, or a text file's lines in paragraphs of about 64 kB."""
        for f in self.files():
            yield from (_jsonl_texts(f) if f.suffix == ".jsonl" else _text_blocks(f))

    def token_ids(self, tok, n_tokens: int) -> torch.Tensor:
        """The first `n_tokens` token ids of the corpus, tokenised document by document with a progress bar."""
        parts, have = [], 0
        with tqdm(total=n_tokens, desc="tokenising stats corpus", unit="tok", leave=False) as bar:
            for text in self.texts():
                ids = tok(text, add_special_tokens=False)["input_ids"][: n_tokens - have]
                parts.append(torch.tensor(ids, dtype=torch.long))
                have += len(ids)
                bar.update(len(ids))
                if have >= n_tokens:
                    break
        if not have:
            raise CorpusError(f"--stats-corpus {self.path}: no text found")
        return torch.cat(parts)


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{path} line {n}: not valid JSON") from None
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict):
                text = next((v for v in row.values() if isinstance(v, str)), None)
            if isinstance(text, str) and text.strip():
                yield text


def _text_blocks(path: Path, size: int = 1 << 16) -> Iterator[str]:
    block: list[str] = []
    length = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            block.append(line)
            length += len(line)
            if length >= size:
                yield "".join(block)
                block, length = [], 0
    if block:
        yield "".join(block)
