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

The ledger stores; it does not touch a model. memory/model_sync.py brings a model to the weights the
ledger rebuilds, checks a model against them before a commit, and carries out rollbacks. This module holds the connection,
migrations and transactions; each job is a mixin beside it: ledger_facts.py (facts, statuses, feed
offsets, batch attempts), ledger_events.py (events, metrics, probes), ledger_weights.py (tensor files,
fingerprints, rebuilt weights), ledger_batches.py (commit, consolidation, the record of a rollback),
ledger_verify.py (verify, gc).
"""
from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from memory.blobs import BlobStore, LedgerError, LedgerMismatch
from memory.ledger_batches import BatchesMixin, BatchInfo, Undone
from memory.ledger_events import Event, EventsMixin
from memory.ledger_facts import FactsMixin, FeedMark
from memory.ledger_verify import VerifyMixin
from memory.ledger_weights import WeightsMixin
from memory.migrations import MIGRATIONS, Migration, applied_names, run_pending

__all__ = ["MIGRATIONS", "BatchInfo", "Event", "FeedMark", "Ledger", "LedgerError", "LedgerMismatch", "Undone"]

log = logging.getLogger(__name__)


class Ledger(FactsMixin, EventsMixin, WeightsMixin, BatchesMixin, VerifyMixin):
    """SQLite edit ledger with content-addressed tensor files and exact rollback; each job is a mixin (facts,
    events, weights, batches, verify) in its own module beside this one."""

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
