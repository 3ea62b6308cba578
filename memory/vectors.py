"""The fact index's append-only vector log: every embedding added since the last FAISS snapshot, with its fact id.

    <index>.log   header (magic, version, dim, base position, embedder tag), then fixed-size records (id, vector)

Record i of the file is the vector at position base + i of the fact index (position = order of addition, which is
ledger id order). Appending a chunk costs only that chunk, so intake stays linear in the feed however large the
index grows; the FAISS snapshot is rewritten only now and then (memory/index.py), and the log restarts empty after
each one. Writes are flushed, not fsynced: the ledger is the source of truth, and whatever a crash loses here is
re-embedded from it. A torn last record or records of facts the ledger never committed are cut off by `truncate`.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"KVEC"
VERSION = 1
HEADER = struct.Struct("<4sIIQ16s")  # magic, version, dim, base position, embedder tag


def embedder_tag(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:16]


def record_dtype(dim: int) -> np.dtype:
    return np.dtype([("id", "<i8"), ("vec", "<f4", (dim,))])


@dataclass
class LogHeader:
    dim: int  # vector dimension
    base: int  # fact-index position of the first record
    tag: bytes  # embedder_tag of the embedder that made the vectors


class VectorLog:
    """The log file at `path`, for vectors made by the embedder called `embedder`."""

    def __init__(self, path: Path, embedder: str):
        self.path = Path(path)
        self.tag = embedder_tag(embedder)

    def header(self) -> LogHeader | None:
        """The header, or None when the file is absent, too short, foreign or from another embedder."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(HEADER.size)
        except FileNotFoundError:
            return None
        if len(raw) < HEADER.size:
            return None
        magic, version, dim, base, tag = HEADER.unpack(raw)
        if magic != MAGIC or version != VERSION or tag != self.tag or dim == 0:
            return None
        return LogHeader(dim, base, tag)

    def records(self, head: LogHeader) -> int:
        """Whole records in the file (a torn last one is not counted)."""
        return (self.path.stat().st_size - HEADER.size) // record_dtype(head.dim).itemsize

    def read_from(self, position: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, vectors) of the records at `position` and after; empty when there is no log; None when the log
        cannot supply them (it starts after `position`, or is unreadable)."""
        head = self.header()
        if head is None:
            return None if self.path.exists() else (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        if head.base > position:
            return None
        dtype = record_dtype(head.dim)
        skip = position - head.base
        count = max(self.records(head) - skip, 0)
        recs = np.fromfile(self.path, dtype=dtype, count=count, offset=HEADER.size + skip * dtype.itemsize)
        return recs["id"].copy(), np.ascontiguousarray(recs["vec"])

    def append(self, position: int, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Write records for positions `position`... at the end of the log (creating it with that base)."""
        if not len(ids):
            return
        head = self.header()
        if head is None:
            self._create(position, vecs.shape[1])
        elif head.base + self.records(head) != position:
            raise ValueError(f"vector log {self.path} ends at position {head.base + self.records(head)}, "
                             f"not {position}")
        recs = np.empty(len(ids), dtype=record_dtype(vecs.shape[1]))
        recs["id"], recs["vec"] = ids, vecs
        with open(self.path, "ab") as fh:
            fh.write(recs.tobytes())

    def _create(self, base: int, dim: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(HEADER.pack(MAGIC, VERSION, dim, base, self.tag))
        os.replace(tmp, self.path)

    def truncate(self, position: int) -> None:
        """Keep only the records before `position` (and no torn record); remove the file if none would stay."""
        head = self.header()
        if head is None or position <= head.base:
            self.path.unlink(missing_ok=True)
            return
        size = HEADER.size + (position - head.base) * record_dtype(head.dim).itemsize
        if self.path.stat().st_size > size:
            os.truncate(self.path, size)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
