"""The ledger's SQLite schema: named migrations, applied in order when a ledger opens.

A migration is (name, fn(db)). `run_pending` runs every one not yet recorded in the `_migrations` table,
each in its own transaction together with its record, so an interrupted upgrade resumes at the first
migration not recorded. A schema change is a new migration at the end; a shipped one is never edited.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from typing import Callable, Sequence

Migration = tuple[str, Callable[[sqlite3.Connection], None]]


def _run(db: sqlite3.Connection, script: str) -> None:
    """Run `;`-separated DDL statements inside the caller's transaction (no executescript: it commits)."""
    for stmt in script.split(";"):
        if stmt.strip():
            db.execute(stmt)


def _m001_initial(db: sqlite3.Connection) -> None:
    _run(db, """
    CREATE TABLE facts (
        id INTEGER PRIMARY KEY, record TEXT NOT NULL, subject_norm TEXT NOT NULL,
        template_norm TEXT NOT NULL, target_norm TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
        reason TEXT, batch_id INTEGER, superseded_by INTEGER, added_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY, method TEXT NOT NULL, status TEXT NOT NULL, delta_hash TEXT NOT NULL,
        keys_hash TEXT NOT NULL, n_facts INTEGER NOT NULL, created_at REAL NOT NULL, reason TEXT,
        replay_of INTEGER);
    CREATE TABLE batch_facts (batch_id INTEGER NOT NULL, fact_id INTEGER NOT NULL, PRIMARY KEY (batch_id, fact_id));
    CREATE TABLE edits (
        batch_id INTEGER NOT NULL, layer INTEGER NOT NULL, rank INTEGER NOT NULL, delta_norm REAL NOT NULL,
        PRIMARY KEY (batch_id, layer));
    CREATE TABLE base_layers (layer INTEGER PRIMARY KEY, hash TEXT NOT NULL, shape TEXT NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, batch_id INTEGER, message TEXT NOT NULL,
        data TEXT);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
    """)


def _m002_metrics_and_probes(db: sqlite3.Connection) -> None:
    _run(db, """
    CREATE TABLE metrics (
        batch_id INTEGER NOT NULL, phase TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (batch_id, phase, name));
    CREATE TABLE probes (
        id INTEGER PRIMARY KEY, batch_id INTEGER, fact_id INTEGER, kind TEXT NOT NULL, prompt TEXT NOT NULL,
        expected TEXT, output TEXT, correct INTEGER, at REAL NOT NULL)
    """)


def _m003_feed_offsets_and_lookup(db: sqlite3.Connection) -> None:
    _run(db, """
    CREATE TABLE feed_offsets (feed TEXT PRIMARY KEY, offset INTEGER NOT NULL, updated_at REAL NOT NULL);
    CREATE INDEX facts_subject ON facts (subject_norm, status);
    CREATE INDEX facts_key ON facts (subject_norm, template_norm, target_norm);
    CREATE INDEX facts_batch ON facts (batch_id)
    """)


def _m004_superseded_lookup(db: sqlite3.Connection) -> None:
    # intake repoints the facts a dropped pending fact was to supersede, and a commit marks the facts its own
    # supersede: without this index each was a scan of every fact, so intake slowed with the ledger's size
    _run(db, "CREATE INDEX facts_superseded_by ON facts (superseded_by) WHERE superseded_by IS NOT NULL")


def _m005_batch_attempts(db: sqlite3.Connection) -> None:
    """Which facts each batch held while it was applied (the crash-loop breaker, agent/breaker.py): a row is
    written before the batch's compute starts and closed when it ends; one still open at the next start means the
    process died holding those facts."""
    _run(db, """
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY, started_at REAL NOT NULL, pid INTEGER NOT NULL, n_facts INTEGER NOT NULL,
        closed_at REAL, outcome TEXT);
    CREATE TABLE attempt_facts (attempt_id INTEGER NOT NULL, fact_id INTEGER NOT NULL,
        PRIMARY KEY (attempt_id, fact_id));
    CREATE INDEX attempt_facts_fact ON attempt_facts (fact_id);
    CREATE INDEX attempts_open ON attempts (closed_at)
    """)


def _m006_consolidations(db: sqlite3.Connection) -> None:
    """A consolidation (`kagent consolidate`) is a batch of kind `consolidated` whose delta is relative to the base
    weights and replaces the chain it covers: those batches get status `consolidated` and name it in `covered_by`
    (rolling the consolidation back makes them committed again, exactly)."""
    _run(db, """
    ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'edit';
    ALTER TABLE batches ADD COLUMN covered_by INTEGER;
    CREATE INDEX batches_covered_by ON batches (covered_by) WHERE covered_by IS NOT NULL
    """)


def _m007_fact_tiers(db: sqlite3.Connection) -> None:
    """Two tiers (issue 27): a batch lists each fact it holds with the tier that answers it, `memory` (an entity-memory
    slot) or `weights` (the MLP weights answer it with the memory off). A fact's tier is the one its latest committed
    batch lists, so rolling a compaction back gives every fact its earlier tier exactly. Rows written before this
    migration hold NULL: their tier follows from the batch (weight layers in `edits`: weights, else memory)."""
    _run(db, """
    ALTER TABLE batch_facts ADD COLUMN tier TEXT;
    CREATE INDEX batch_facts_fact ON batch_facts (fact_id)
    """)


def _m008_ram_metrics_phase(db: sqlite3.Connection) -> None:
    """A batch's estimated and measured peak RAM (agent/admission.py: `estimate_mb`, `peak_rss_mb` / `peak_gpu_mb`)
    were stored under the metrics phase `memory`, a word that also names the fact store and the entity memory
    (issue 29); they are the phase `ram` from here on. A plain UPDATE: a clash on the primary key fails the
    migration (its transaction rolls back) rather than dropping a row."""
    db.execute("UPDATE metrics SET phase = 'ram' WHERE phase = 'memory'")


MIGRATIONS: list[Migration] = [
    ("m001_initial", _m001_initial),
    ("m002_metrics_and_probes", _m002_metrics_and_probes),
    ("m003_feed_offsets_and_lookup", _m003_feed_offsets_and_lookup),
    ("m004_superseded_lookup", _m004_superseded_lookup),
    ("m005_batch_attempts", _m005_batch_attempts),
    ("m006_consolidations", _m006_consolidations),
    ("m007_fact_tiers", _m007_fact_tiers),
    ("m008_ram_metrics_phase", _m008_ram_metrics_phase),
]



def run_pending(db: sqlite3.Connection, migrations: Sequence[Migration],
                transaction: Callable[[], AbstractContextManager]) -> list[str]:
    """Apply every migration not yet recorded in `_migrations`, each inside its own `transaction()`; return their
    names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    applied = []
    for name, fn in migrations:
        if name in done:
            continue
        with transaction():
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
        applied.append(name)
    return applied


def applied_names(db: sqlite3.Connection) -> list[str]:
    """Names of the migrations applied so far, in the order they were applied."""
    return [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
