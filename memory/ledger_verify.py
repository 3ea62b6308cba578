"""The ledger's integrity checks (`kagent verify`) and the collection of orphan tensor files (`gc`).

A mixin of memory.ledger.Ledger, which brings the connection (`db`), the tensor files (`blobs`) and the weights mixin.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from editors.delta import EditDelta
from memory.blobs import BlobStore, weight_matches
from memory.migrations import MIGRATIONS

log = logging.getLogger("memory.ledger")  # the ledger's one logger, as before the split


class VerifyMixin:
    """verify, orphan_files, gc."""

    db: sqlite3.Connection
    blobs: BlobStore

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
        weights = self._build(self.committed_ids())
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
