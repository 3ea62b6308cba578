"""The watch loop: follow a feed, take facts into the fact store, and apply them in guarded batches.

A batch is formed when `batch_size` facts are pending, or with fewer once the oldest pending fact has waited
`max_wait` seconds; `once` reads what is there, applies everything (partial batches included) and returns.
Facts deferred for predicted interference are retried in a later flush and quarantined after MAX_DEFERS tries.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from agent.admission import run_admitted
from agent.batch import BatchOutcome
from agent.feed import FeedFollower
from agent.intake import IntakeStats, intake, resume_position
from agent.session import Session
from memory import planner
from memory.record import StoredFact

log = logging.getLogger(__name__)

MAX_DEFERS = 2


@dataclass
class WatchOptions:
    once: bool = False  # process what is there, then return
    batch_size: int = 10  # facts per batch
    max_wait: float = 30.0  # seconds before a partial batch is applied
    poll: float = 1.0  # seconds between looks at the feed
    max_polls: int | None = None  # stop after this many polls (tests); None = until interrupted


@dataclass
class WatchSummary:
    intake: IntakeStats = field(default_factory=IntakeStats)
    batches: list[BatchOutcome] = field(default_factory=list)

    def count(self, what: str) -> int:
        return sum(len(getattr(b, what)) for b in self.batches)

    def line(self) -> str:
        return (f"{self.intake.lines} line(s): {self.intake.added} new fact(s), {self.intake.duplicates} duplicate(s), "
                f"{self.intake.superseding} superseding, {len(self.intake.bad)} bad; {self.count('applied')} applied "
                f"in {self.count('committed')} batch(es), {self.count('failed')} failed, "
                f"{self.count('quarantined')} quarantined, "
                f"{self.count('deferred')} deferred")


def batch_line(out: BatchOutcome) -> str:
    """One-line summary of a batch."""
    m = out.metrics
    probes = " ".join(f"{k}={m[k]:.3g}" for k in ("damage", "floor", "known_acc", "perplexity", "retention",
                                                   "efficacy", "interference", "delta_ratio") if k in m)
    ids = ",".join(map(str, out.committed)) or "-"
    extra = f", {len(out.failed)} failed" if out.failed else ""
    extra += f", {len(out.quarantined)} quarantined" if out.quarantined else ""
    extra += f", {len(out.deferred)} deferred" if out.deferred else ""
    return f"batch {ids}: {len(out.applied)} applied{extra} in {out.seconds:.1f}s  {probes}".rstrip()


class Watcher:
    """One feed, one session: intake, batch formation and guarded application."""

    def __init__(self, session: Session, feed: Path, opts: WatchOptions, echo: Callable[[str], None] = log.info):
        self.session, self.opts, self.echo = session, opts, echo
        self.follower = FeedFollower(resume_position(session.ledger, feed))
        self.summary = WatchSummary()
        self.defers: dict[int, int] = {}
        self.waiting_since: float | None = None

    def plan(self, skip: set[int]) -> list[list[StoredFact]]:
        facts = [f for f in self.session.fact_index.pending() if f.id not in skip]
        cfg = self.session.cfg
        vecs = self.session.fact_index.vectors([f.id for f in facts]) if cfg.order in ("cluster", "spread") and facts else None
        by_id = {f.id: f for f in facts}
        groups = planner.plan([f.id for f in facts], vecs, self.opts.batch_size, cfg.order, cfg.seed)
        return [[by_id[i] for i in g] for g in groups]

    def flush(self, partial: bool) -> None:
        """Apply every full batch (and partial ones when `partial`); facts deferred now wait for the next flush."""
        skip: set[int] = set()
        while batches := [b for b in self.plan(skip) if partial or len(b) == self.opts.batch_size]:
            bar = tqdm(batches, desc="batches", unit="batch", leave=False, disable=None)
            for facts in bar:  # run_batch behind the intake re-checks, crash-loop breaker and RAM budget
                out = run_admitted(self.session, facts, self.defers, MAX_DEFERS, self.echo)
                skip |= set(out.deferred)
                self.summary.batches.append(out)
                self.echo(batch_line(out) + out.ram_note())

    def due(self) -> bool:
        """A partial batch is due once the oldest pending fact has waited max_wait seconds."""
        if not self.session.fact_index.pending():
            self.waiting_since = None
            return False
        self.waiting_since = self.waiting_since or time.monotonic()
        return time.monotonic() - self.waiting_since >= self.opts.max_wait

    def step(self, final: bool) -> None:
        got = intake(self.session.fact_index, self.follower, final, self.session.limits.problem)  # agent/limits.py
        self.summary.intake.merge(got)
        for bad in got.bad:
            self.echo(f"skipped bad {bad}")
        self.flush(partial=final or self.due())
        if final:
            while any(self.defers.get(f.id, 0) for f in self.session.fact_index.pending()):
                self.flush(partial=True)

    def run(self) -> WatchSummary:
        try:
            if self.opts.once:
                self.step(final=True)
                return self.summary
            polls = 0
            while self.opts.max_polls is None or polls < self.opts.max_polls:
                self.step(final=False)
                polls += 1
                time.sleep(self.opts.poll)
            return self.summary
        finally:
            self.follower.close()


def watch(session: Session, feed: Path, opts: WatchOptions, echo: Callable[[str], None] = log.info) -> WatchSummary:
    """Follow `feed` (see module docstring); returns what was read and applied."""
    return Watcher(session, Path(feed), opts, echo).run()
