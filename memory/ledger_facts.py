"""The ledger's facts: their statuses and supersede links, the feed offsets read with them, and the batch attempts
(which facts a batch held while it ran: the crash-loop breaker's record).

A mixin of memory.ledger.Ledger, which brings the connection (`db`) and `transaction()`.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from memory.blobs import LedgerError
from memory.record import FactRecord, StoredFact


@dataclass(frozen=True)
class FeedMark:
    """Where reading a feed stopped, as the ledger recorded it."""

    offset: int  # bytes read, committed with the facts read
    lineno: int = 0  # lines read (0 when the last `feed` event does not agree with the offset)
    inode: int | None = None  # the file's inode at that point, if known


class FactsMixin:
    """Facts and their statuses, feed offsets, batch attempts."""

    db: sqlite3.Connection

    def add_facts(self, facts: Sequence[FactRecord], feed: str | None = None, offset: int | None = None,
                  keys: Sequence[tuple[str, str, str]] | None = None) -> list[int]:
        """Insert facts as pending and (optionally) the feed's new byte offset, in one transaction. `keys`: the
        facts' `key`s when the caller has them already. Ids follow the highest one, as SQLite would number them."""
        now = time.time()
        keys = keys if keys is not None else [f.key for f in facts]
        with self.transaction():
            first = self.last_fact_id() + 1
            ids = list(range(first, first + len(facts)))
            self.db.executemany(
                "INSERT INTO facts (id, record, subject_norm, template_norm, target_norm, status, added_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                [(i, f.to_json(), *k, now, now) for i, f, k in zip(ids, facts, keys)])
            if feed is not None and offset is not None:
                self.set_feed_offset(feed, offset)
        return ids

    def set_feed_offset(self, feed: str, offset: int) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO feed_offsets VALUES (?, ?, ?)", (feed, int(offset), time.time()))

    def feed_offset(self, feed: str) -> int:
        """Byte offset of `feed` read so far (0 for a feed never read)."""
        row = self.db.execute("SELECT offset FROM feed_offsets WHERE feed = ?", (feed,)).fetchone()
        return int(row["offset"]) if row else 0

    def feed_position(self, feed: str) -> FeedMark:
        """The stored read position of `feed`: its offset, plus the line number and inode of its last `feed` event
        when that event is at the same offset (else the offset alone)."""
        offset = self.feed_offset(feed)
        row = self.db.execute("SELECT data FROM events WHERE kind = 'feed' AND json_extract(data, '$.feed') = ? "
                              "ORDER BY id DESC LIMIT 1", (feed,)).fetchone()
        data = json.loads(row["data"]) if row else {}
        if data.get("offset") != offset:
            return FeedMark(offset)
        return FeedMark(offset, int(data.get("lineno", 0)), data.get("inode"))

    @staticmethod
    def _stored(row: sqlite3.Row) -> StoredFact:
        tier = row["tier"] if "tier" in row.keys() and row["status"] == "applied" else None
        return StoredFact(row["id"], FactRecord.model_validate_json(row["record"]), row["status"], row["batch_id"],
                          row["reason"], row["superseded_by"], tier)

    def _fact_select(self) -> str:
        """SELECT of facts with each fact's tier: the one its latest committed batch lists (m007_fact_tiers)."""
        if "m007_fact_tiers" not in self.applied_migrations():
            return "SELECT * FROM facts WHERE 1=1"
        return ("SELECT facts.*, (SELECT COALESCE(bf.tier, CASE WHEN EXISTS (SELECT 1 FROM edits e WHERE "
                "e.batch_id = bf.batch_id) THEN 'weights' ELSE 'memory' END) FROM batch_facts bf JOIN batches b ON "
                "b.id = bf.batch_id WHERE bf.fact_id = facts.id AND b.status = 'committed' ORDER BY b.id DESC "
                "LIMIT 1) AS tier FROM facts WHERE 1=1")

    def facts(self, status: str | Sequence[str] | None = None, ids: Iterable[int] | None = None) -> list[StoredFact]:
        """Facts in id order, optionally filtered by status(es) and/or ids; applied ones with their tier."""
        sql, args = self._fact_select(), []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += statuses
        if ids is not None:
            id_list = [int(i) for i in ids]
            sql += f" AND id IN ({','.join('?' * len(id_list))})" if id_list else " AND 0"
            args += id_list
        return [self._stored(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def fact(self, fact_id: int) -> StoredFact:
        found = self.facts(ids=[fact_id])
        if not found:
            raise LedgerError(f"no fact {fact_id} in the ledger")
        return found[0]

    def fact_ids(self) -> list[int]:
        return [r["id"] for r in self.db.execute("SELECT id FROM facts ORDER BY id")]

    def last_fact_id(self) -> int:
        """The highest fact id (0 for an empty ledger); facts are never deleted, so it grows with every insert."""
        return int(self.db.execute("SELECT coalesce(max(id), 0) FROM facts").fetchone()[0])

    def unsettled_about(self, subjects: Iterable[str]) -> list[StoredFact]:
        """Pending, applied or quarantined facts not already being superseded, about any of these normalised
        subjects, in id order: what a new fact about one of them may duplicate (exact key) or replace (pending or
        applied ones). One query per 500 subjects."""
        subs, rows = sorted(set(subjects)), []
        for start in range(0, len(subs), 500):
            part = subs[start:start + 500]
            rows += self.db.execute(
                f"SELECT * FROM facts WHERE subject_norm IN ({','.join('?' * len(part))}) AND status IN"
                " ('pending', 'applied', 'quarantined') AND superseded_by IS NULL", part).fetchall()
        return [self._stored(r) for r in sorted(rows, key=lambda r: r["id"])]

    def set_status(self, fact_ids: Iterable[int], status: str, reason: str | None = None) -> None:
        with self.transaction():
            for fid in fact_ids:
                self.db.execute("UPDATE facts SET status = ?, reason = ?, updated_at = ? WHERE id = ?",
                                (status, reason, time.time(), int(fid)))

    def set_superseded_by(self, old_ids: Iterable[int], new_id: int) -> None:
        """Point applied facts at the newer fact that will replace them (status changes when it commits)."""
        with self.transaction():
            for fid in old_ids:
                self.db.execute("UPDATE facts SET superseded_by = ?, updated_at = ? WHERE id = ?",
                                (int(new_id), time.time(), int(fid)))

    def repoint_superseded(self, from_id: int, to_id: int) -> None:
        """Facts waiting to be superseded by `from_id` wait for `to_id` instead."""
        self.db.execute("UPDATE facts SET superseded_by = ?, updated_at = ? WHERE superseded_by = ?"
                        " AND status = 'applied'", (int(to_id), time.time(), int(from_id)))

    def quarantine(self, fact_ids: Iterable[int], reason: str) -> None:
        """Set pending facts aside (never edited, never re-planned); applied ones must be rolled back first."""
        ids = [int(i) for i in fact_ids]
        with self.transaction():
            for f in self.facts(ids=ids):
                if f.status != "pending":
                    raise LedgerError(f"fact {f.id} is {f.status}; only pending facts can be quarantined")
            self.set_status(ids, "quarantined", reason)
            self.log_event("quarantine", f"quarantined {len(ids)} fact(s): {reason}", data={"facts": ids})

    # ------------------------------------------------------------------ batch attempts (crash-loop breaker)

    def open_attempt(self, fact_ids: Sequence[int]) -> int:
        """Record, durably and before any compute, that this process is applying a batch holding `fact_ids`."""
        with self.transaction():
            cur = self.db.execute("INSERT INTO attempts (started_at, pid, n_facts) VALUES (?, ?, ?)",
                                  (time.time(), os.getpid(), len(fact_ids)))
            aid = int(cur.lastrowid)
            self.db.executemany("INSERT INTO attempt_facts VALUES (?, ?)", [(aid, int(f)) for f in fact_ids])
        return aid

    def close_attempt(self, attempt_id: int, outcome: str) -> None:
        """The batch ended (committed, rejected, deferred: "done"; or an error kagent reported)."""
        with self.transaction():
            self.db.execute("UPDATE attempts SET closed_at = ?, outcome = ? WHERE id = ?",
                            (time.time(), outcome, attempt_id))

    def close_abandoned_attempts(self) -> list[tuple[int, int, list[int]]]:
        """Mark every attempt left open as `died` (its process ended without closing it); return (attempt id,
        pid, fact ids) of each, oldest first."""
        with self.transaction():
            rows = self.db.execute("SELECT id, pid FROM attempts WHERE closed_at IS NULL ORDER BY id").fetchall()
            out = [(r["id"], r["pid"], self._attempt_facts(r["id"])) for r in rows]
            self.db.execute("UPDATE attempts SET closed_at = ?, outcome = 'died' WHERE closed_at IS NULL",
                            (time.time(),))
        return out

    def _attempt_facts(self, attempt_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT fact_id FROM attempt_facts WHERE attempt_id = ? ORDER BY "
                                              "fact_id", (attempt_id,))]

    def deaths(self, fact_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """fact id -> (attempts holding it that died, of which it was the only fact), for facts with any."""
        ids = [int(i) for i in fact_ids]
        if not ids:
            return {}
        rows = self.db.execute(
            f"SELECT af.fact_id, COUNT(*) AS n, SUM(a.n_facts = 1) AS alone FROM attempt_facts af JOIN attempts a "
            f"ON a.id = af.attempt_id WHERE a.outcome = 'died' AND af.fact_id IN ({','.join('?' * len(ids))}) "
            f"GROUP BY af.fact_id", ids)
        return {r["fact_id"]: (int(r["n"]), int(r["alone"])) for r in rows}
