"""The crash-loop breaker: a fact whose batch keeps taking the process down is isolated, then quarantined.

A fact that kills the editor (out of RAM, a crash in native code, a kernel kill) stays `pending`, so every later
`watch` and the nightly `refresh` would pick it up and die the same way. So before a batch is applied, `attempt`
records in the ledger which facts it holds (`Ledger.open_attempt`, committed before any compute), and closes the
record when the batch ends, committed or rejected. A record still open when the next batch is planned means the
process died holding it; `recover` marks it `died` and logs a `crash` event. Then, for each still-pending fact:

- after `crash_isolate_after` (2) deaths it is attempted alone;
- once it has also died `crash_quarantine_after` (1) time(s) alone, it is quarantined with the reason
  "stopped the editor N times", and the rest of the feed goes on.

An error kagent reports itself (disk or database full, a ledger error) or an interrupt (Ctrl-C) closes the record
without counting it; any other exception leaves it open, so it counts like a kill.
"""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from agent.config import AgentConfig
from memory.ledger import Ledger, LedgerError
from memory.record import StoredFact

log = logging.getLogger(__name__)

NOT_COUNTED = (LedgerError, OSError, sqlite3.OperationalError, KeyboardInterrupt)  # the fact is not to blame


@dataclass
class Verdicts:
    """What the breaker says about a planned batch's facts."""

    quarantine: list[tuple[StoredFact, str]] = field(default_factory=list)  # (fact, reason)
    alone: list[StoredFact] = field(default_factory=list)  # to be attempted one at a time
    rest: list[StoredFact] = field(default_factory=list)  # no deaths enough to matter


def recover(ledger: Ledger) -> list[int]:
    """Close the attempts of runs that died holding them (one `crash` event each); return the facts they held."""
    held: list[int] = []
    for aid, pid, facts in ledger.close_abandoned_attempts():
        msg = (f"a run (pid {pid}) died while applying a batch of {len(facts)} fact(s) {facts}: killed, out of "
               "RAM or crashed")
        ledger.log_event("crash", msg, data={"attempt": aid, "pid": pid, "facts": facts})
        log.warning(msg)
        held += facts
    return held


def judge(ledger: Ledger, facts: Sequence[StoredFact], cfg: AgentConfig) -> Verdicts:
    """Sort a planned batch's facts by their deaths: quarantine, alone, or as planned."""
    deaths = ledger.deaths(f.id for f in facts)
    out = Verdicts()
    for f in facts:
        n, alone = deaths.get(f.id, (0, 0))
        if n >= cfg.crash_isolate_after + cfg.crash_quarantine_after and alone >= cfg.crash_quarantine_after:
            out.quarantine.append((f, f"stopped the editor {n} times (the process died while its batch was "
                                      f"applied, {alone} time(s) with it alone: killed, out of RAM or crashed)"))
        elif n >= cfg.crash_isolate_after:
            out.alone.append(f)
        else:
            out.rest.append(f)
    return out


@contextmanager
def attempt(ledger: Ledger, facts: Sequence[StoredFact]) -> Iterator[None]:
    """Hold an open attempt record for `facts` while the body applies them (see the module docstring)."""
    aid = ledger.open_attempt([f.id for f in facts])
    try:
        yield
    except NOT_COUNTED as exc:
        _close_after_error(ledger, aid, exc)
        raise
    ledger.close_attempt(aid, "done")


def _close_after_error(ledger: Ledger, aid: int, exc: BaseException) -> None:
    """Close the record, or (the database itself failing, e.g. full) leave it: the error in hand is the one to
    report, and a record left open only counts one death."""
    try:
        ledger.close_attempt(aid, f"error: {type(exc).__name__}")
    except sqlite3.Error as close_exc:
        log.warning("could not close batch attempt %d after %s: %s", aid, type(exc).__name__, close_exc)
