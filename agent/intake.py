"""Reading a feed into the fact store: validation, bad-line records, and the feed position in one transaction.

Lines are read in chunks of at most CHUNK_LINES. For each chunk, in one ledger transaction: the valid facts go
through the fact index (dedup, supersede) and are stored as pending with the feed's byte offset; every bad line becomes
a `bad_line` event with its line number and reason; a `feed` event records the position (offset, line number,
inode) so a restart resumes exactly there, following rotation that happened while kagent was stopped. A `check`
(the watch loop passes agent/limits.py's token limits) turns a schema-valid record it objects to into a bad line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.feed import FeedFollower, FeedLine, FeedPosition
from memory.index import FactIndex
from memory.ledger import Ledger
from memory.record import BadRecord, FactRecord, parse_line

log = logging.getLogger(__name__)

CHUNK_LINES = 256

RecordCheck = Callable[[FactRecord], "tuple[str, str] | None"]  # (field, reason) when a record must be refused


@dataclass
class IntakeStats:
    lines: int = 0  # non-blank lines read
    added: int = 0  # new pending facts
    duplicates: int = 0  # exact or paraphrase duplicates dropped
    superseding: int = 0  # facts that replace an earlier one (pending, applied, or earlier in the same chunk)
    bad: list[str] = field(default_factory=list)  # one-line reasons of bad lines

    def merge(self, other: "IntakeStats") -> None:
        self.lines += other.lines
        self.added += other.added
        self.duplicates += other.duplicates
        self.superseding += other.superseding
        self.bad += other.bad


def feed_key(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def resume_position(ledger: Ledger, path: Path) -> FeedPosition:
    """The stored position of `path`: the ledger's offset plus line number and inode from the last `feed` event."""
    key = feed_key(path)
    mark = ledger.feed_position(key)
    return FeedPosition(key, mark.offset, mark.lineno, mark.inode)


def parse(item: FeedLine, check: RecordCheck | None = None) -> FactRecord | BadRecord:
    if item.error:
        return BadRecord(item.lineno, "-", item.error)
    try:
        record = parse_line(item.line, item.lineno)
    except BadRecord as exc:
        bad = (exc.lineno, exc.field, exc.reason)
    else:
        problem = check(record) if check is not None else None
        if problem is None:
            return record
        bad = (item.lineno, *problem)
    # a fresh BadRecord: the caught one's traceback holds this frame and the caller's (with its whole chunk), a
    # reference cycle that only the cyclic garbage collector frees, so a long feed piled them up until it ran
    return BadRecord(*bad)


def read_chunk(follower: FeedFollower, final: bool) -> list[FeedLine]:
    out = []
    for item in follower.read(final=final):
        out.append(item)
        if len(out) >= CHUNK_LINES:
            break
    return out


def store_chunk(index: FactIndex, key: str, items: list[FeedLine], position: FeedPosition,
                check: RecordCheck | None = None) -> IntakeStats:
    """Facts, bad lines and the new feed position of one chunk, atomically."""
    parsed = [parse(i, check) for i in items]
    facts = [p for p in parsed if isinstance(p, FactRecord)]
    bad = [p for p in parsed if isinstance(p, BadRecord)]
    ledger = index.ledger
    with ledger.transaction():
        plan = index.add(facts, feed=key, offset=position.offset)
        for b in bad:
            ledger.log_event("bad_line", f"{Path(key).name}: {b}", data={"feed": key, "lineno": b.lineno,
                                                                     "field": b.field, "reason": b.reason})
        ledger.log_event("feed", f"read {Path(key).name} to line {position.lineno} (byte {position.offset})",
                         data={"feed": key, "offset": position.offset, "lineno": position.lineno,
                               "inode": position.inode, "n_facts": len(facts), "n_bad": len(bad)})
    for b in bad:
        log.info("skipped bad line: %s: %s", Path(key).name, b)
    return IntakeStats(len(items), len(plan.added), plan.duplicates + plan.paraphrase_duplicates,
                       len(plan.dropped_pending) + len(plan.supersedes) + plan.dropped_in_chunk, [str(b) for b in bad])


def intake(index: FactIndex, follower: FeedFollower, final: bool, check: RecordCheck | None = None) -> IntakeStats:
    """Read everything available now (chunk by chunk) into the fact store; `check` may refuse valid records."""
    total = IntakeStats()
    key = str(follower.path)
    while items := read_chunk(follower, final):
        total.merge(store_chunk(index, key, items, follower.position, check))
        index.checkpoint()  # the chunk is committed: the fact index may take a snapshot now
    return total
