"""The edit ledger: what was changed in the model, when, why, and how to undo it exactly.

SQLite (WAL) holds facts, batches, per-layer edits, metrics, probe results, events, feed
offsets and batch attempts (which facts a batch held while it ran: the crash-loop breaker's
record); its schema is memory/migrations.py, applied when the ledger opens. Tensors (each
batch's delta and keys, the base copies of edited layers) are content-addressed files beside
the database, kept by memory/blobs.py.

The model in use is always base weights + committed deltas, in commit order. A batch commits
atomically: files are written first (temp + rename), then one DB transaction; a crash in
between leaves orphan files and no batch. Rollback never counter-edits: edited layers are
rebuilt from the stored base copies plus the remaining stack; rolling back an older batch
replays the later ones through a caller-supplied `recompute`.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta, add_low_rank
from editors.entity_memory import MemoryWrite, merge_writes
from editors.models import fingerprint
from memory.blobs import (BlobStore, Fingerprint, LedgerError, LedgerMismatch, hash_tensors, keys_from_tensors,
                          keys_tensors, layer_fingerprint, weight_matches, weight_rtol)
from memory.migrations import MIGRATIONS, Migration, applied_names, run_pending
from memory.record import FactRecord, StoredFact

log = logging.getLogger(__name__)

class KeyState(Protocol):
    """What the ledger needs from the editor state: add or remove a batch's keys."""

    def add_keys(self, keys: dict[int, torch.Tensor], sign: float = 1.0) -> None: ...


Recompute = Callable[[list[StoredFact]], tuple[EditDelta, dict[int, torch.Tensor]]]


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class BatchInfo:
    """One batch as history() reports it."""

    id: int  # batch id (commit order)
    method: str  # editor that produced it (encore / memit / alphaedit)
    status: str  # committed | rolled_back | replaced (rolled back, then replayed) | consolidated (covered by one)
    created_at: float  # unix time of the commit
    n_facts: int  # facts edited in it
    layers: list[int]  # edited layers
    delta_hash: str  # content hash of its delta file
    keys_hash: str  # content hash of its keys file
    reason: str | None  # why it was rolled back / replaced
    replay_of: int | None  # batch it replays, if it was recomputed after a rollback
    kind: str = "edit"  # edit | consolidated (a re-solve of every live fact, relative to the base weights)
    covered_by: int | None = None  # the consolidation that replaced this batch (status `consolidated`)


@dataclass(frozen=True)
class Event:
    """One line of the ledger's event log."""

    id: int  # event id (increasing)
    at: float  # unix time
    kind: str  # intake | commit | rollback | replay | quarantine | attach | ...
    batch_id: int | None  # batch concerned, if any
    message: str  # human-readable, one line
    data: dict[str, Any]  # structured details


@dataclass(frozen=True)
class FeedMark:
    """Where reading a feed stopped, as the ledger recorded it."""

    offset: int  # bytes read, committed with the facts read
    lineno: int = 0  # lines read (0 when the last `feed` event does not agree with the offset)
    inode: int | None = None  # the file's inode at that point, if known


@dataclass(frozen=True)
class RollbackReport:
    """What a rollback did."""

    batch_id: int  # the batch rolled back
    fact_ids: list[int]  # its facts (bar those a later batch holds now), now status rolled_back
    replayed: list[tuple[int, int]]  # (old batch, new batch) pairs recomputed after it
    message: str  # one-line summary (also logged and stored as an event)


# ----------------------------------------------------------------------------- weights


def _add_delta(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """The same arithmetic as EditDelta.apply (sign=+1), so rebuilds reproduce live weights bit for bit."""
    add_low_rank(w, u, v, 1.0)


# ----------------------------------------------------------------------------- the ledger


class Ledger:
    """SQLite edit ledger with content-addressed tensor files and exact rollback."""

    def __init__(self, root: Path | str, migrations: Sequence[Migration] = MIGRATIONS):
        self.root = Path(root)  # directory holding ledger.db, deltas/, keys/, base/
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)  # the tensor files
        self.db = sqlite3.connect(self.root / "ledger.db", isolation_level=None, timeout=30.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._depth = 0  # nesting depth of transaction()
        self._expected: dict[int, torch.Tensor] | None = None  # tracked layer -> base + committed stack
        self.migrate(migrations)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
        """Apply every migration not yet recorded in `_migrations`, each in its own transaction."""
        applied = run_pending(self.db, migrations, self.transaction)
        for name in applied:
            log.info("ledger %s: applied migration %s", self.root, name)
        return applied

    def applied_migrations(self) -> list[str]:
        return applied_names(self.db)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction; nested uses join the outermost one."""
        if self._depth == 0:
            self.db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self.db
        except BaseException:
            self._depth -= 1
            if self._depth == 0 and self.db.in_transaction:  # SQLite has rolled back itself on e.g. a full disk
                self.db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self.db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ facts

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

    # ------------------------------------------------------------------ events, metrics, probes

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

    # ------------------------------------------------------------------ files

    def load_delta(self, batch_id: int) -> EditDelta:
        """The batch's delta, checked against its recorded content hash."""
        digest = self._batch_row(batch_id)["delta_hash"]
        delta = EditDelta.from_tensors(self.blobs.load("deltas", digest))
        if delta.content_hash() != digest:
            raise LedgerMismatch(f"delta file of batch {batch_id} does not match its hash {digest[:12]} (tampered?)")
        return delta

    def load_keys(self, batch_id: int) -> dict[int, torch.Tensor]:
        digest = self._batch_row(batch_id)["keys_hash"]
        tensors = self.blobs.load("keys", digest)
        if hash_tensors(tensors) != digest:
            raise LedgerMismatch(f"keys file of batch {batch_id} does not match its hash {digest[:12]} (tampered?)")
        return keys_from_tensors(tensors)

    def _base(self) -> dict[int, torch.Tensor]:
        out = {}
        for r in self.db.execute("SELECT layer, hash FROM base_layers"):
            tensors = self.blobs.load("base", r["hash"])
            if hash_tensors(tensors) != r["hash"]:
                raise LedgerMismatch(f"base copy of layer {r['layer']} does not match its hash (tampered?)")
            out[r["layer"]] = tensors["weight"]
        return out

    def base_fingerprint(self) -> str | None:
        """editors.models.fingerprint of the base model this ledger was attached to."""
        return self._meta("base_fingerprint")

    def tracked_layers(self) -> list[int]:
        return [r["layer"] for r in self.db.execute("SELECT layer FROM base_layers ORDER BY layer")]

    # ------------------------------------------------------------------ model state

    def _committed_ids(self) -> list[int]:
        return [r["id"] for r in self.db.execute("SELECT id FROM batches WHERE status = 'committed' ORDER BY id")]

    def _build(self, batch_ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """Tracked layers = base copies + the given batches' deltas, in order."""
        weights = {layer: w.clone() for layer, w in self._base().items()}
        for bid in batch_ids:
            for d in self.load_delta(bid).layers:
                _add_delta(weights[d.layer], d.u, d.v)
        return weights

    def memory_write(self) -> MemoryWrite | None:
        """Entity-memory slots of the committed batches, in commit order (a later slot of a subject replaces an
        earlier one); None when no committed batch wrote any. Rollback changes which batches count, so the
        memory after a rollback is exactly the memory before the rolled-back batches."""
        return merge_writes([self.load_delta(b).memory for b in self._committed_ids()])

    def expected_weights(self) -> dict[int, torch.Tensor]:
        """Tracked layers as they must be in the model now (base + committed deltas), cached per ledger."""
        if self._expected is None:
            self._expected = self._build(self._committed_ids())
        return self._expected

    def _stored_fingerprints(self) -> dict[int, Fingerprint]:
        raw = self._meta("layers_fingerprint")
        return {int(k): v for k, v in json.loads(raw).items()} if raw else {}

    def _store_fingerprints(self, weights: Mapping[int, torch.Tensor]) -> None:
        fps = self._stored_fingerprints() | {layer: layer_fingerprint(w, layer) for layer, w in weights.items()}
        self._set_meta("layers_fingerprint", json.dumps({str(k): v for k, v in fps.items()}))

    def attach(self, model: nn.Module, layers: Iterable[int]) -> None:
        """Bind a freshly loaded base model: check it is the ledger's base, store base copies of
        `layers` not yet tracked, then rebuild base + committed deltas into it (load_into)."""
        fp = fingerprint(model)
        stored = self._meta("base_fingerprint")
        if stored is not None and stored != fp:
            raise LedgerMismatch(f"model fingerprint {fp} differs from the ledger's base model {stored}; "
                                 f"this ledger ({self.root}) was built on another model")
        new = sorted(set(layers) - set(self.tracked_layers()))
        with self.transaction():
            self._set_meta("base_fingerprint", fp)
            snaps = {}
            for layer in new:
                w = weight_view(model, layer).detach().cpu().clone().contiguous()
                digest = hash_tensors({"weight": w})
                self.blobs.write("base", digest, {"weight": w})
                self.db.execute("INSERT INTO base_layers VALUES (?, ?, ?)", (layer, digest, json.dumps(list(w.shape))))
                snaps[layer] = w
            self._store_fingerprints(snaps)
            if new:
                self.log_event("attach", f"tracking base weights of layer(s) {new}", data={"layers": new})
        self._expected = None
        self.load_into(model)

    def load_into(self, model: nn.Module) -> None:
        """Rebuild base + committed deltas, check the stored fingerprint, write the layers into `model`."""
        weights = self.expected_weights()
        stored = self._stored_fingerprints()
        for layer, w in weights.items():
            if layer in stored and not weight_matches(w, layer, stored[layer]):
                self._expected = None
                raise LedgerMismatch(f"layer {layer} rebuilt from base + committed deltas does not match the "
                                     f"fingerprint recorded at the last commit; the ledger at {self.root} is "
                                     "inconsistent (run `kagent verify`)")
        self.restore(model)

    def restore(self, model: nn.Module) -> None:
        """Write the expected tracked layers into `model` (discards any uncommitted delta)."""
        with torch.no_grad():
            for layer, w in self.expected_weights().items():
                view = weight_view(model, layer)
                view.copy_(w.to(view.device, view.dtype))

    def check_model(self, model: nn.Module, weights: Mapping[int, torch.Tensor] | None = None) -> None:
        """Raise LedgerMismatch unless the model's tracked layers equal `weights` (default: expected)."""
        weights = self.expected_weights() if weights is None else weights
        for layer, w in weights.items():
            got = weight_view(model, layer).detach().to("cpu", torch.float64)
            err = float((got - w.double()).norm() / w.double().norm().clamp_min(1e-12))
            if err > weight_rtol(w.dtype):
                raise LedgerMismatch(f"layer {layer} of the model differs from base + committed deltas "
                                     f"(relative error {err:.2e}); apply exactly the committed delta before commit")

    # ------------------------------------------------------------------ batches

    def _batch_row(self, batch_id: int) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no batch {batch_id} in the ledger")
        return row

    def _info(self, row: sqlite3.Row) -> BatchInfo:
        layers = [r["layer"] for r in self.db.execute("SELECT layer FROM edits WHERE batch_id = ? ORDER BY layer",
                                                      (row["id"],))]
        return BatchInfo(row["id"], row["method"], row["status"], row["created_at"], row["n_facts"], layers,
                         row["delta_hash"], row["keys_hash"], row["reason"], row["replay_of"], row["kind"],
                         row["covered_by"])

    def batch(self, batch_id: int) -> BatchInfo:
        return self._info(self._batch_row(batch_id))

    def history(self) -> list[BatchInfo]:
        """Every batch ever committed, in commit order, with its current status."""
        return [self._info(r) for r in self.db.execute("SELECT * FROM batches ORDER BY id")]

    def batch_facts(self, batch_id: int) -> list[StoredFact]:
        ids = [r["fact_id"] for r in self.db.execute("SELECT fact_id FROM batch_facts WHERE batch_id = ?",
                                                     (batch_id,))]
        return self.facts(ids=ids)

    def commit(self, facts: Sequence[StoredFact | int], delta: EditDelta, keys: Mapping[int, torch.Tensor],
               metrics: Mapping[str, Mapping[str, float]] | None = None, method: str = "encore",
               model: nn.Module | None = None, replay_of: int | None = None,
               failed: Mapping[int, str] | None = None) -> int:
        """Record a batch whose delta has been applied to `model` (checked when given); return its id.

        `metrics` maps phase ("before", "after") to name -> value; `failed` maps the ids of facts the batch holds
        but that did not take (the model does not answer them) to the reason: they get status `failed`.
        Files first, then one transaction.
        """
        fact_ids = [f.id if isinstance(f, StoredFact) else int(f) for f in facts]
        delta.check_finite()
        new_weights = self._weights_after(delta)
        if model is not None:
            self.check_model(model, self.expected_weights() | new_weights)
        self._check_pending(fact_ids)
        delta_hash = delta.content_hash()
        keys_hash = hash_tensors(keys_tensors(keys))
        try:
            self.blobs.write("deltas", delta_hash, delta.tensors())
            self.blobs.write("keys", keys_hash, keys_tensors(keys))
        except LedgerError as exc:
            raise LedgerError(f"{exc}; the batch of {len(fact_ids)} fact(s) was not committed, they stay pending"
                              ) from exc.__cause__
        try:
            batch_id = self._record_batch(fact_ids, delta, delta_hash, keys_hash, metrics or {}, method, replay_of,
                                          new_weights, failed or {})
        except sqlite3.OperationalError as exc:  # disk full, I/O error: SQLite rolled the transaction back
            raise LedgerError(f"cannot record the batch in {self.root / 'ledger.db'} ({exc}); the batch of "
                              f"{len(fact_ids)} fact(s) was not committed, they stay pending") from exc
        self.expected_weights().update(new_weights)
        return batch_id

    def consolidate(self, delta: EditDelta, keys: Mapping[int, torch.Tensor],
                    metrics: Mapping[str, Mapping[str, float]], method: str, model: nn.Module | None = None,
                    tiers: Mapping[int, str] | None = None) -> int:
        """Record a consolidation: `delta` is relative to the base weights (its memory slots replace every earlier
        one) and the model holds base + delta; every committed batch becomes `consolidated`, covered by the new
        batch, which lists the facts applied now, each with its tier from `tiers` (fact id -> memory | weights;
        unlisted: derived from the batch). Their old deltas stay on disk: rolling the consolidation back rebuilds
        the chain bit for bit, tiers included."""
        delta.check_finite()
        weights = self._build([])
        for d in delta.layers:
            _add_delta(weights[d.layer], d.u, d.v)
        if model is not None:
            self.check_model(model, weights)
        delta_hash, keys_hash = delta.content_hash(), hash_tensors(keys_tensors(keys))
        self.blobs.write("deltas", delta_hash, delta.tensors())
        self.blobs.write("keys", keys_hash, keys_tensors(keys))
        chain = self._committed_ids()
        live = [f.id for f in self.facts(status="applied")]
        now = time.time()
        with self.transaction():
            bid = int(self.db.execute(
                "INSERT INTO batches (method, status, delta_hash, keys_hash, n_facts, created_at, kind)"
                " VALUES (?, 'committed', ?, ?, ?, ?, 'consolidated')",
                (method, delta_hash, keys_hash, len(live), now)).lastrowid)
            for d in delta.layers:
                self.db.execute("INSERT OR REPLACE INTO edits VALUES (?, ?, ?, ?)",
                                (bid, d.layer, d.u.shape[1], float(d.dense().norm())))
            self.db.executemany("INSERT INTO batch_facts (batch_id, fact_id, tier) VALUES (?, ?, ?)",
                                [(bid, f, (tiers or {}).get(f)) for f in live])
            marks = ",".join("?" * len(chain))
            self.db.execute(f"UPDATE batches SET status = 'consolidated', covered_by = ? WHERE id IN ({marks})",
                            (bid, *chain))
            for phase, values in metrics.items():
                self.add_metrics(bid, phase, values)
            self._store_fingerprints(weights)
            self.log_event("consolidate", f"consolidated batches {chain} into batch {bid}: {len(live)} live fact(s)"
                           f" re-solved from the base weights", bid, {"covers": chain, "facts": live})
        self._expected = weights
        return bid

    def _weights_after(self, delta: EditDelta) -> dict[int, torch.Tensor]:
        expected = self.expected_weights()
        missing = sorted({d.layer for d in delta.layers} - set(expected))
        if missing:
            raise LedgerError(f"layer(s) {missing} are not tracked; call attach(model, layers) before editing them")
        out = {}
        for d in delta.layers:
            w = out.get(d.layer, expected[d.layer].clone())
            _add_delta(w, d.u, d.v)
            out[d.layer] = w
        return out

    def _check_pending(self, fact_ids: Sequence[int]) -> None:
        found = {f.id: f.status for f in self.facts(ids=fact_ids)}
        bad = [f"{i} ({found.get(i, 'unknown')})" for i in fact_ids if found.get(i) != "pending"]
        if bad:
            raise LedgerError(f"only pending facts can be committed; not pending: {', '.join(bad)}")

    def _record_batch(self, fact_ids: Sequence[int], delta: EditDelta, delta_hash: str, keys_hash: str,
                      metrics: Mapping[str, Mapping[str, float]], method: str, replay_of: int | None,
                      new_weights: Mapping[int, torch.Tensor], failed: Mapping[int, str]) -> int:
        """The single DB transaction of a commit."""
        now = time.time()
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO batches (method, status, delta_hash, keys_hash, n_facts, created_at, replay_of)"
                " VALUES (?, 'committed', ?, ?, ?, ?, ?)", (method, delta_hash, keys_hash, len(fact_ids), now,
                                                            replay_of))
            bid = int(cur.lastrowid)
            for d in delta.layers:
                self.db.execute("INSERT OR REPLACE INTO edits VALUES (?, ?, ?, ?)",
                                (bid, d.layer, d.u.shape[1], float(d.dense().norm())))
            self._attach_facts(bid, fact_ids, now, failed)
            for phase, values in metrics.items():
                self.add_metrics(bid, phase, values)
            self._store_fingerprints(new_weights)
            what = f"replayed batch {replay_of} as batch {bid}" if replay_of else f"committed batch {bid}"
            self.log_event("commit", f"{what}: {len(fact_ids)} fact(s) by {method}", bid,
                           {"facts": list(fact_ids), "delta": delta_hash})
        return bid

    def _attach_facts(self, bid: int, fact_ids: Sequence[int], now: float, failed: Mapping[int, str]) -> None:
        """Facts of a new batch: applied (superseding what they replace) or failed (superseding nothing)."""
        for fid in fact_ids:
            status, why = ("failed", failed[fid]) if fid in failed else ("applied", None)
            self.db.execute("INSERT INTO batch_facts (batch_id, fact_id) VALUES (?, ?)", (bid, fid))
            self.db.execute("UPDATE facts SET status = ?, batch_id = ?, reason = ?, updated_at = ? WHERE id = ?",
                            (status, bid, why, now, fid))
        took = [f for f in fact_ids if f not in failed]
        marks = ",".join("?" * len(took))
        self.db.execute(f"UPDATE facts SET status = 'superseded', reason = 'superseded by fact ' || superseded_by,"
                        f" updated_at = ? WHERE status = 'applied' AND superseded_by IN ({marks})",
                        (now, *took))

    # ------------------------------------------------------------------ rollback

    def rollback(self, batch_id: int, model: nn.Module, state: KeyState | None = None,
                 recompute: Recompute | None = None, reason: str = "rolled back by user") -> RollbackReport:
        """Undo a committed batch exactly (no counter-edit). For an older batch, later batches are
        reverted too and replayed through `recompute(facts) -> (delta, keys)`, as new batches."""
        row = self._batch_row(batch_id)
        if row["status"] == "consolidated":  # un-consolidate (exact), then roll the batch back out of its chain
            first = self.rollback(row["covered_by"], model, state, recompute,
                                  f"to roll back batch {batch_id}, which it covers")
            then = self.rollback(batch_id, model, state, recompute, reason)
            return RollbackReport(batch_id, then.fact_ids, then.replayed, f"{first.message}; then {then.message}")
        if row["status"] != "committed":
            raise LedgerError(f"batch {batch_id} is {row['status']}, not committed")
        committed = self._committed_ids()
        later = [b for b in committed if b > batch_id]
        if later and recompute is None:
            raise LedgerError(f"batch {batch_id} is not the latest: rolling it back must replay batches {later}; "
                              "pass recompute=, or use rollback_to()")
        keys = {b: self.load_keys(b) for b in [batch_id] + later}  # read (and hash-check) everything first
        weights = self._build([b for b in committed if b < batch_id])
        if state is not None:
            for bid in reversed([batch_id] + later):
                state.add_keys(keys[bid], sign=-1.0)
        if row["kind"] == "consolidated":
            covered, weights = self._record_unconsolidate(batch_id, later, reason)
            if state is not None:
                for bid in covered:
                    state.add_keys(self.load_keys(bid))
            fact_ids: list[int] = []
            what = f"consolidation {batch_id} (batches {covered} are committed again)"
        else:
            # a fact re-queued from this batch and applied again by a later one belongs to the later batch now
            fact_ids = [f.id for f in self.batch_facts(batch_id) if f.batch_id == batch_id]
            self._record_rollback(batch_id, later, fact_ids, reason, weights)
            what = f"batch {batch_id} ({len(fact_ids)} fact(s))"
        self._expected = weights
        self.restore(model)
        replayed = self._replay(later, model, state, recompute) if later else []
        msg = f"rolled back {what}: {reason}"
        if replayed:
            msg += "; replayed later batches " + ", ".join(f"{o}->{n}" for o, n in replayed) + " with recomputed deltas"
        self.log_event("rollback", msg, batch_id, {"facts": fact_ids, "replayed": replayed})
        if replayed:
            log.warning(msg)
        return RollbackReport(batch_id, fact_ids, replayed, msg)

    def _record_rollback(self, batch_id: int, later: Sequence[int], fact_ids: Sequence[int], reason: str,
                         weights: Mapping[int, torch.Tensor]) -> None:
        now = time.time()
        with self.transaction():
            self.db.execute("UPDATE batches SET status = 'rolled_back', reason = ? WHERE id = ?", (reason, batch_id))
            for fid in fact_ids:
                self.db.execute("UPDATE facts SET status = 'rolled_back', reason = ?, updated_at = ? WHERE id = ?",
                                (f"batch {batch_id} rolled back: {reason}", now, fid))
            marks = ",".join("?" * len(fact_ids))
            self.db.execute(f"UPDATE facts SET status = 'applied', superseded_by = NULL, reason = NULL, "
                            f"updated_at = ? WHERE superseded_by IN ({marks}) AND status IN ('applied', 'superseded')",
                            (now, *fact_ids))
            self._replace_later(batch_id, later, now)
            self._store_fingerprints(weights)

    def _replace_later(self, batch_id: int, later: Sequence[int], now: float) -> None:
        """Batches after rolled-back `batch_id` are `replaced`; their facts go back to pending for the replay."""
        for bid in later:
            why = f"replayed after rollback of batch {batch_id}"
            self.db.execute("UPDATE batches SET status = 'replaced', reason = ? WHERE id = ?", (why, bid))
            self.db.execute("UPDATE facts SET status = 'pending', reason = ?, updated_at = ? WHERE id IN "
                            "(SELECT fact_id FROM batch_facts WHERE batch_id = ?) AND status IN "
                            "('applied', 'superseded')", (why, now, bid))

    def _record_unconsolidate(self, batch_id: int, later: Sequence[int],
                              reason: str) -> tuple[list[int], dict[int, torch.Tensor]]:
        """Rolling back consolidation `batch_id`, in one transaction: the chain it covered is committed again (its
        facts never left it), later batches are replaced as in any rollback, and the fingerprints follow. Returns
        the batches committed again and the weights they rebuild."""
        covered = [r["id"] for r in self.db.execute("SELECT id FROM batches WHERE covered_by = ? ORDER BY id",
                                                    (batch_id,))]
        with self.transaction():
            self.db.execute("UPDATE batches SET status = 'rolled_back', reason = ? WHERE id = ?", (reason, batch_id))
            self.db.execute("UPDATE batches SET status = 'committed', covered_by = NULL WHERE covered_by = ?",
                            (batch_id,))
            self._replace_later(batch_id, later, time.time())
            weights = self._build(self._committed_ids())
            self._store_fingerprints(weights)
        return covered, weights

    def _replay(self, later: Sequence[int], model: nn.Module, state: KeyState | None,
                recompute: Recompute) -> list[tuple[int, int]]:
        replayed = []
        for old in later:
            facts = [f for f in self.batch_facts(old) if f.status == "pending"]
            if not facts:
                continue
            delta, keys = recompute(facts)
            delta.apply(model)
            if state is not None:
                state.add_keys(keys)
            new = self.commit(facts, delta, keys, None, self._batch_row(old)["method"], model, replay_of=old)
            self.log_event("replay", f"replayed batch {old} as batch {new} ({len(facts)} fact(s))", new,
                           {"replay_of": old})
            replayed.append((old, new))
        return replayed

    def rollback_to(self, batch_id: int, model: nn.Module, state: KeyState | None = None,
                    reason: str = "rolled back by user") -> list[RollbackReport]:
        """Roll back every committed batch after `batch_id` (0 = all), latest first; no replay needed."""
        reports = []
        while later := [b for b in self._committed_ids() if b > batch_id]:  # a consolidation recommits its chain
            reports.append(self.rollback(later[-1], model, state, reason=f"{reason} (rollback to batch {batch_id})"))
        return reports

    # ------------------------------------------------------------------ integrity

    def verify(self) -> list[str]:
        """Re-hash every tensor file and check the DB against the files; return problems (empty = healthy)."""
        problems = self._check_sqlite() + self._check_files() + self._check_facts()
        if not problems:
            problems += self._check_rebuild()
        for p in problems:
            log.error("ledger verify: %s", p)
        return problems

    def _check_sqlite(self) -> list[str]:
        out = [f"sqlite: {r[0]}" for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        missing = [n for n, _ in MIGRATIONS if n not in self.applied_migrations()]
        return out + [f"migration {n} not applied" for n in missing]

    def _check_files(self) -> list[str]:
        out = []
        for r in self.db.execute("SELECT id, delta_hash, keys_hash FROM batches ORDER BY id").fetchall():
            delta_problems = self.blobs.check("deltas", r["delta_hash"], f"batch {r['id']}")
            out += delta_problems + self.blobs.check("keys", r["keys_hash"], f"batch {r['id']}")
            layers = {row["layer"] for row in self.db.execute("SELECT layer FROM edits WHERE batch_id = ?", (r["id"],))}
            path = self.blobs.path("deltas", r["delta_hash"])
            if not delta_problems and {d.layer for d in EditDelta.load(path).layers} != layers:
                out.append(f"batch {r['id']}: edited layers in the DB {sorted(layers)} differ from its delta file")
        for r in self.db.execute("SELECT layer, hash FROM base_layers"):
            out += self.blobs.check("base", r["hash"], f"base copy of layer {r['layer']}")
        return out

    def _check_facts(self) -> list[str]:
        """Fact statuses against their batches, and the links between facts and batches."""
        rows = self.db.execute(
            "SELECT f.id, f.status, f.batch_id, b.status AS bstatus FROM facts f LEFT JOIN batches b"
            " ON f.batch_id = b.id WHERE f.status IN ('applied', 'superseded')")
        out = [f"fact {r['id']} is {r['status']} but its batch {r['batch_id']} is {r['bstatus']}"
               for r in rows if r["bstatus"] not in ("committed", "consolidated")]
        out += [f"fact {r[0]} names batch {r[1]}, which does not list it" for r in self.db.execute(
            "SELECT id, batch_id FROM facts f WHERE batch_id IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM batch_facts bf WHERE bf.batch_id = f.batch_id AND bf.fact_id = f.id)")]
        out += [f"fact {r[0]} is superseded by fact {r[1]}, which is not in the ledger" for r in self.db.execute(
            "SELECT id, superseded_by FROM facts f WHERE superseded_by IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM facts g WHERE g.id = f.superseded_by)")]
        return out + [f"batch {r[0]} records {r[1]} fact(s) but lists {r[2]}" for r in self.db.execute(
            "SELECT b.id, b.n_facts, (SELECT count(*) FROM batch_facts bf WHERE bf.batch_id = b.id) AS n"
            " FROM batches b WHERE b.n_facts != n")]

    def _check_rebuild(self) -> list[str]:
        stored = self._stored_fingerprints()
        weights = self._build(self._committed_ids())
        return [f"layer {layer}: base + committed deltas do not match the recorded fingerprint"
                for layer, w in weights.items()
                if layer in stored and not weight_matches(w, layer, stored[layer])]

    def _referenced(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT delta_hash FROM batches UNION SELECT keys_hash FROM batches"
                                              " UNION SELECT hash FROM base_layers")}

    def orphan_files(self) -> list[Path]:
        """Tensor files no DB row refers to (left by a crash between file write and commit)."""
        return self.blobs.orphans(self._referenced())

    def gc(self) -> list[Path]:
        """Delete orphan files; return them."""
        return self.blobs.gc(self._referenced())
