"""Following a JSONL feed file like `tail -F`: appends, rotation (new inode) and truncation (size < offset).

The follower streams: it reads one line at a time from an open binary handle and never holds more than one line
(capped at `max_line_bytes`) in memory. Each yielded line carries its 1-based line number and the byte offset just
after it; the caller persists that position (through the ledger, in the same transaction as the facts read) and
passes it back on restart so reading resumes exactly where it stopped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class FeedPosition:
    """Where reading stopped: byte offset and line number in the file with this inode."""

    path: str
    offset: int = 0
    lineno: int = 0
    inode: int | None = None


class FeedLine(NamedTuple):
    lineno: int  # 1-based line number in the current file
    offset: int  # byte offset just after this line
    line: str  # the line without its newline ("" when `error` is set)
    error: str | None = None  # why the raw bytes are not a usable line (too long, not UTF-8)


class FeedFollower:
    """Yields complete lines of a growing file, following rotation and truncation."""

    def __init__(self, position: FeedPosition, max_line_bytes: int = MAX_LINE_BYTES):
        self.path = Path(position.path)
        self.position = position
        self.max_line_bytes = max_line_bytes
        self._fh: BinaryIO | None = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FeedFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, final: bool = False) -> Iterator[FeedLine]:
        """Yield the complete lines available now. `final` also yields an unterminated last line."""
        stat = self._stat()
        if self._fh is None:
            if stat is None:
                return
            self._open(stat)
        elif stat is not None and stat.st_ino != self.position.inode:
            yield from self._drain()
            log.info("feed %s was rotated; following the new file", self.path)
            self.close()
            self._open(stat, rotated=True)
        elif stat is not None and stat.st_size < self.position.offset:
            log.warning("feed %s was truncated; reading it again from the start", self.path)
            self._restart_at_zero()
        yield from self._lines(final)

    def _stat(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None

    def _open(self, stat: os.stat_result, rotated: bool = False) -> None:
        self._fh = open(self.path, "rb")
        pos = self.position
        if rotated or (pos.inode is not None and pos.inode != stat.st_ino):
            if not rotated:
                log.warning("feed %s was replaced since the last run; reading the new file from the start", self.path)
            pos = FeedPosition(str(self.path))
        elif stat.st_size < pos.offset:
            log.warning("feed %s is shorter than the stored offset (truncated); reading from the start", self.path)
            pos = FeedPosition(str(self.path))
        self.position = replace(pos, inode=os.fstat(self._fh.fileno()).st_ino)
        self._fh.seek(self.position.offset)

    def _restart_at_zero(self) -> None:
        assert self._fh is not None
        self.position = replace(self.position, offset=0, lineno=0)
        self._fh.seek(0)

    def _drain(self) -> Iterator[FeedLine]:
        """The rest of a rotated-away file: nothing more will be appended, so a last partial line counts."""
        yield from self._lines(final=True)

    def _lines(self, final: bool) -> Iterator[FeedLine]:
        while (item := self._next_line(final)) is not None:
            if item.line or item.error:
                yield item

    def _next_line(self, final: bool) -> FeedLine | None:
        fh = self._fh
        assert fh is not None
        start = fh.tell()
        raw = fh.readline(self.max_line_bytes + 1)
        if not raw:
            return None
        if len(raw) > self.max_line_bytes and not raw.endswith(b"\n"):
            return self._skip_long_line(start, final)
        if not raw.endswith(b"\n") and not final:
            fh.seek(start)  # partial line: wait for the writer to finish it
            return None
        return self._advance(fh.tell(), raw)

    def _skip_long_line(self, start: int, final: bool) -> FeedLine | None:
        fh = self._fh
        assert fh is not None
        while chunk := fh.readline(self.max_line_bytes):
            if chunk.endswith(b"\n"):
                break
        else:
            if not final:
                fh.seek(start)
                return None
        return self._advance(fh.tell(), b"", error=f"line longer than {self.max_line_bytes} bytes")

    def _advance(self, offset: int, raw: bytes, error: str | None = None) -> FeedLine:
        lineno = self.position.lineno + 1
        pos = self.position  # built directly: dataclasses.replace costs a second per 100,000 lines
        self.position = FeedPosition(pos.path, offset, lineno, pos.inode)
        text = ""
        if error is None:
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                error = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
        if not text.strip() and error is None:
            text = ""
        return FeedLine(lineno, offset, text, error)
