"""The served model: a workspace's model holding exactly its committed edits, kept current while `kagent serve` runs.

`ServedModel.open` loads the configured model once, checks it is the ledger's base model, and writes the committed
edits into it (`memory.model_sync.load_into`: base + committed weight deltas; `Ledger.memory_write`: the committed
entity-memory slots, attached with `EntityMemory.attached`), as `kagent ask` and `check` do. No editor,
covariance statistics or fact index is built: serving needs none of them.

Live edits. `kagent watch` (another process) commits, rolls back and consolidates batches while the server runs. A
poller thread reads SQLite's `PRAGMA data_version` every `poll_s` seconds (it changes only when another connection
commits); when it changed, a fresh ledger connection opens one read transaction (a WAL snapshot, so nothing it
reads is half a commit), compares the committed batch ids with those served, and when they differ builds the new
weights and memory slots outside any lock, then takes the write side of a readers-writer lock only to copy the
tracked layers into the model and swap the memory. A generation holds the read side for its whole length, so each
response is generated under one set of committed batches, which it names (`State.batch`). The server never takes
the workspace's write lock (`Workspace.writer`), so `watch` runs beside it.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from agent.views import status_counts
from agent.workspace import Workspace
from editors.entity_memory import EntityMemory
from editors.models import LoadedModel, dtype_name, fingerprint, load_model
from memory.ledger import Ledger, LedgerError, LedgerMismatch
from memory.model_sync import load_into

log = logging.getLogger(__name__)


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers (so a reload is never starved). Release may
    happen on another thread than acquire (a generation is admitted on the event loop and ends in a worker)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0  # generations running
        self._writer = False  # a reload is swapping the edits
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class State:
    """The committed edits the model holds now."""

    committed: tuple[int, ...]  # ids of the committed batches, in commit order
    facts: dict[str, int]  # facts by status when this state was read
    tiers: dict[str, int]  # applied facts by tier (memory / weights) when the ledger records tiers
    slots: int  # entity-memory slots attached
    memory_layer: int | None  # layer of the entity memory (None: no slots)
    loaded_at: float  # unix time the state went live

    @property
    def batch(self) -> int:
        """The newest committed batch (0: no edits): what responses and /health name."""
        return self.committed[-1] if self.committed else 0


def committed_ids(ledger: Ledger) -> tuple[int, ...]:
    return tuple(b.id for b in ledger.history() if b.status == "committed")


@contextmanager
def snapshot(ledger: Ledger) -> Iterator[Ledger]:
    """One read transaction on `ledger`: every read inside sees the same commit (WAL), and no write lock is taken."""
    ledger.db.execute("BEGIN")
    try:
        yield ledger
    finally:
        ledger.db.execute("COMMIT")


def tier_counts(ledger: Ledger) -> dict[str, int]:
    out: dict[str, int] = {}
    for fact in ledger.facts(status="applied"):
        tier = getattr(fact, "tier", None)
        if tier:
            out[tier] = out.get(tier, 0) + 1
    return out


@dataclass
class ServedModel:
    """The model with the committed edits, its readers-writer lock and the poller that keeps it current."""

    ws: Workspace
    loaded: LoadedModel
    poll_s: float = 0.5  # seconds between looks at the ledger
    lock: RWLock = field(default_factory=RWLock)
    state: State | None = None  # what the model holds now
    reload_error: str | None = None  # the last failed reload's reason (the previous state is kept)
    preempt: threading.Event = field(default_factory=threading.Event)  # set while a reload waits for the generations
    #   in flight: one that has sent nothing yet may stop and run again under the new edits (agent/serve.py)
    _memory_hooks: ExitStack = field(default_factory=ExitStack)
    _stop: threading.Event = field(default_factory=threading.Event)
    _poller: threading.Thread | None = None

    @classmethod
    def open(cls, ws: Workspace, poll_s: float = 0.5, loaded: LoadedModel | None = None) -> "ServedModel":
        """Load the workspace's model, check it is the ledger's base model, and write the committed edits into it."""
        cfg = ws.config()
        loaded = loaded or load_model(cfg.model, **cfg.load_options())
        with Ledger(ws.ledger_dir) as ledger:
            expected, got = ledger.base_fingerprint(), fingerprint(loaded.model)
        if expected is not None and expected != got:
            raise LedgerMismatch(f"model {loaded.name} (fingerprint {got}) is not the base model of this "
                                 f"workspace's ledger ({expected})")
        served = cls(ws, loaded, poll_s)
        served.refresh()
        if served.state is None:
            raise LedgerMismatch(f"cannot load the committed edits of {ws.root}: {served.reload_error}")
        return served

    @property
    def model(self):
        return self.loaded.model

    @property
    def tok(self):
        return self.loaded.tok

    def describe(self) -> dict[str, str]:
        p = next(self.model.parameters())
        return {"model": self.loaded.name, "dtype": dtype_name(p.dtype), "device": str(p.device)}

    @contextmanager
    def reading(self) -> Iterator[State]:
        """The read side for one generation: the edits do not change inside the block; yields what they are."""
        self.lock.acquire_read()
        try:
            yield self.state
        finally:
            self.lock.release_read()

    def refresh(self) -> bool:
        """Bring the model to the ledger's committed edits when they changed; True when it reloaded. A failure is
        logged and kept in `reload_error`, and the model keeps the state it had."""
        try:
            with Ledger(self.ws.ledger_dir) as ledger, snapshot(ledger):
                ids = committed_ids(ledger)
                if self.state is not None and ids == self.state.committed:
                    return False
                self._load(ledger, ids)
        except (LedgerError, OSError, sqlite3.Error, ValueError) as exc:
            self.reload_error = f"{type(exc).__name__}: {exc}"
            log.error("serve: keeping batch %s; reloading the committed edits failed: %s",
                      self.state.batch if self.state else "-", self.reload_error)
            return False
        self.reload_error = None
        log.info("serve: now serving batch %d (%d committed)", self.state.batch, len(self.state.committed))
        return True

    def _load(self, ledger: Ledger, ids: tuple[int, ...]) -> None:
        """Inside one snapshot: build weights and slots unlocked, then swap them in under the write lock."""
        ledger.expected_weights()  # base + committed deltas, built (and cached on this ledger) before locking
        write = ledger.memory_write()
        memory = EntityMemory.from_write(self.tok, write)
        facts, tiers = status_counts(ledger), tier_counts(ledger)
        self.preempt.set()
        try:
            with self.lock.writing():
                load_into(ledger, self.model)  # checks the stored fingerprints, then copies the cached layers
                self._memory_hooks.close()
                if memory is not None:
                    self._memory_hooks.enter_context(memory.attached(self.model))
                self.state = State(ids, facts, tiers, len(memory.slots) if memory else 0,
                                   memory.layer if memory else None, time.time())
        finally:
            self.preempt.clear()

    def start(self) -> None:
        """Start the poller thread (a daemon; `stop` or `close` stops it)."""
        if self._poller is not None:
            raise RuntimeError("the ledger poller is already running")
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="kagent-serve-poller", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        db = sqlite3.connect(self.ws.ledger_dir / "ledger.db", timeout=30.0, isolation_level=None)
        try:
            seen = None
            while not self._stop.wait(self.poll_s):
                try:
                    version = db.execute("PRAGMA data_version").fetchone()[0]
                    if version != seen or self.reload_error:
                        seen = version
                        self.refresh()
                except Exception as exc:  # the poller outlives any one failed look; /health shows it
                    self.reload_error = f"{type(exc).__name__}: {exc}"
                    log.exception("serve: looking at the ledger failed")
        finally:
            db.close()

    def stop(self) -> None:
        """Stop the poller (the model keeps the state it has)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None

    def close(self) -> None:
        """Stop the poller and take the entity memory's hooks off the model."""
        self.stop()
        with self.lock.writing():
            self._memory_hooks.close()

