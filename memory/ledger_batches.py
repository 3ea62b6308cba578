"""The ledger's batches: commit (files first, then one transaction), consolidation, and the record of an exact
rollback.

Rollback never counter-edits: edited layers are rebuilt from the stored base copies plus the remaining stack. The
ledger records and rebuilds; the model side (memory/model_sync.py) writes the weights into the model and replays
the later batches of an older one through a caller-supplied `recompute`.

A mixin of memory.ledger.Ledger, which brings the connection (`db`), the tensor files (`blobs`), `transaction()`, and
the other mixins (facts, events, weights).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from editors.delta import EditDelta
from memory.blobs import BlobStore, LedgerError, hash_tensors, keys_tensors
from memory.record import StoredFact


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
class Undone:
    """What `undo` recorded, for the model side to follow (memory/model_sync.rollback)."""

    batch_id: int  # the batch rolled back
    fact_ids: list[int]  # its facts (bar those a later batch holds now), now status rolled_back
    later: list[int]  # later batches, now `replaced` and their facts pending: to replay, in commit order
    what: str  # what was rolled back, for the one-line summary
    keys_out: list[dict[int, torch.Tensor]]  # keys of the batches that left the stack, latest first
    keys_back: list[dict[int, torch.Tensor]]  # keys of the batches committed again (a consolidation's chain)


class BatchesMixin:
    """Batches: commit, consolidate, and the record of a rollback."""

    db: sqlite3.Connection
    root: Path
    blobs: BlobStore
    _expected: dict[int, torch.Tensor] | None

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
               metrics: Mapping[str, Mapping[str, float]] | None = None, method: str = "encore", *,
               replay_of: int | None = None, failed: Mapping[int, str] | None = None) -> int:
        """Record a batch; return its id. The caller has applied `delta` to its model (memory/model_sync.
        commit_applied checks that first).

        `metrics` maps phase ("before", "after") to name -> value; `failed` maps the ids of facts the batch holds
        but that did not take (the model does not answer them) to the reason: they get status `failed`.
        Files first, then one transaction.
        """
        fact_ids = [f.id if isinstance(f, StoredFact) else int(f) for f in facts]
        delta.check_finite()
        new_weights = self.weights_after(delta)
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
                    metrics: Mapping[str, Mapping[str, float]], method: str, *,
                    tiers: Mapping[int, str] | None = None) -> int:
        """Record a consolidation: `delta` is relative to the base weights (its memory slots replace every earlier
        one) and the caller's model holds base + delta (memory/model_sync.consolidate_applied checks it); every
        committed batch becomes `consolidated`, covered by the new batch, which lists the facts applied now, each
        with its tier from `tiers` (fact id -> memory | weights; unlisted: derived from the batch). Their old deltas
        stay on disk: rolling the consolidation back rebuilds the chain bit for bit, tiers included."""
        delta.check_finite()
        weights = self.weights_from_base(delta)
        delta_hash, keys_hash = delta.content_hash(), hash_tensors(keys_tensors(keys))
        self.blobs.write("deltas", delta_hash, delta.tensors())
        self.blobs.write("keys", keys_hash, keys_tensors(keys))
        chain = self.committed_ids()
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

    def undo(self, batch_id: int, reason: str, replay: bool) -> Undone:
        """Record the exact rollback of committed batch `batch_id` (no counter-edit): its facts go back to
        rolled_back (a consolidation's chain is committed again instead), later batches become `replaced` with
        their facts pending, and expected_weights() is rebuilt from the base copies and the remaining stack. The
        model side (memory/model_sync.rollback) then writes those weights and replays the later batches; without
        `replay`, a batch that is not the latest is refused."""
        row = self._batch_row(batch_id)
        if row["status"] != "committed":
            raise LedgerError(f"batch {batch_id} is {row['status']}, not committed")
        committed = self.committed_ids()
        later = [b for b in committed if b > batch_id]
        if later and not replay:
            raise LedgerError(f"batch {batch_id} is not the latest: rolling it back must replay batches {later}; "
                              "pass recompute=, or use rollback_to()")
        keys = {b: self.load_keys(b) for b in [batch_id] + later}  # read (and hash-check) everything first
        weights = self._build([b for b in committed if b < batch_id])
        keys_out = [keys[b] for b in reversed([batch_id] + later)]
        if row["kind"] == "consolidated":
            covered, weights = self._record_unconsolidate(batch_id, later, reason)
            keys_back = [self.load_keys(b) for b in covered]
            fact_ids: list[int] = []
            what = f"consolidation {batch_id} (batches {covered} are committed again)"
        else:
            # a fact re-queued from this batch and applied again by a later one belongs to the later batch now
            fact_ids = [f.id for f in self.batch_facts(batch_id) if f.batch_id == batch_id]
            self._record_rollback(batch_id, later, fact_ids, reason, weights)
            keys_back = []
            what = f"batch {batch_id} ({len(fact_ids)} fact(s))"
        self._expected = weights
        return Undone(batch_id, fact_ids, later, what, keys_out, keys_back)

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
            weights = self._build(self.committed_ids())
            self._store_fingerprints(weights)
        return covered, weights
