"""The ledger's event log, per-batch metrics and probe results.

A mixin of memory.ledger.Ledger, which brings the connection (`db`) and `transaction()`.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

log = logging.getLogger("memory.ledger")  # the ledger's one logger, as before the split


@dataclass(frozen=True)
class Event:
    """One line of the ledger's event log."""

    id: int  # event id (increasing)
    at: float  # unix time
    kind: str  # intake | commit | rollback | replay | quarantine | attach | ...
    batch_id: int | None  # batch concerned, if any
    message: str  # human-readable, one line
    data: dict[str, Any]  # structured details


class EventsMixin:
    """Events, metrics, probes."""

    db: sqlite3.Connection

    def log_event(self, kind: str, message: str, batch_id: int | None = None,
                  data: Mapping[str, Any] | None = None) -> int:
        cur = self.db.execute("INSERT INTO events (at, kind, batch_id, message, data) VALUES (?, ?, ?, ?, ?)",
                              (time.time(), kind, batch_id, message, json.dumps(dict(data or {}))))
        log.info("ledger event %s: %s", kind, message)
        return int(cur.lastrowid)

    def events(self, kind: str | None = None, since_id: int = 0, limit: int | None = None) -> list[Event]:
        sql, args = "SELECT * FROM events WHERE id > ?", [since_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        return [Event(r["id"], r["at"], r["kind"], r["batch_id"], r["message"], json.loads(r["data"] or "{}"))
                for r in self.db.execute(sql, args)]

    def add_metrics(self, batch_id: int, phase: str, metrics: Mapping[str, float]) -> None:
        with self.transaction():
            for name, value in metrics.items():
                self.db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                                (batch_id, phase, name, float(value)))

    def metrics(self, batch_id: int) -> dict[str, dict[str, float]]:
        """phase ("before" / "after" / ...) -> metric name -> value."""
        out: dict[str, dict[str, float]] = {}
        for r in self.db.execute("SELECT * FROM metrics WHERE batch_id = ?", (batch_id,)):
            out.setdefault(r["phase"], {})[r["name"]] = r["value"]
        return out

    def add_probes(self, batch_id: int | None, probes: Iterable[Mapping[str, Any]]) -> None:
        """Store probe results: dicts with fact_id, kind, prompt, expected, output, correct."""
        with self.transaction():
            for p in probes:
                self.db.execute(
                    "INSERT INTO probes (batch_id, fact_id, kind, prompt, expected, output, correct, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, p.get("fact_id"), p["kind"], p["prompt"], p.get("expected"), p.get("output"),
                     None if p.get("correct") is None else int(bool(p["correct"])), time.time()))

    def probes(self, batch_id: int | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM probes" + (" WHERE batch_id = ?" if batch_id is not None else "")
                               + " ORDER BY id", (batch_id,) if batch_id is not None else ())
        return [dict(r) for r in rows]
