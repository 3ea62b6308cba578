"""Admitting a planned batch to the editor: the checks again, the crash-loop breaker and the RAM budget.

`run_admitted` is what the watch loop calls for each planned batch, around agent/batch.py's `run_batch`:

1. attempts left open by runs that died are recorded as deaths (agent/breaker.py `recover`);
2. facts stored before the intake checks existed, or before a limit was lowered, are checked again (text hygiene,
   memory/hygiene.py; token limits, agent/limits.py) and quarantined with the reason intake would have given;
3. the breaker quarantines facts that stopped the editor too often and sets aside those to be attempted alone;
4. the RAM budget (agent/budget.py) splits the rest into groups that fit, and quarantines a fact too big alone;
5. each group runs through `run_batch` inside an attempt record; its estimated and measured peak RAM (on CUDA: the
   GPU's) are stored as the committed batches' metrics of phase `ram` (RAM_PHASE) and shown on the watch line.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent import breaker
from agent.batch import BatchOutcome, run_batch
from agent.budget import RamBudget, Split
from agent.session import Session
from editors.devices import cuda_devices, peak_gpu_mb, reset_gpu_peak
from editors.footprint import peak_mb, reset_peak
from memory.hygiene import record_problem, shown
from memory.record import StoredFact

LABEL_CHARS = 60  # of a fact's prompt shown in a quarantine line
RAM_PHASE = "ram"  # ledger metrics phase of a batch's estimated and measured peak RAM (`memory` before m008)


@dataclass
class AdmittedOutcome(BatchOutcome):
    estimates: list[float] = field(default_factory=list)  # estimated peak (MiB) of each group applied
    peaks: list[float] = field(default_factory=list)  # measured peak (MiB) while each group was applied
    gpu: bool = False  # estimates and peaks are of the model's GPUs' RAM (CUDA), not the process's RSS

    def ram_note(self) -> str:
        """"  RAM est E MiB, peak P MiB" ("GPU RAM" on CUDA) over the groups applied ("" when none was)."""
        if not self.estimates:
            return ""
        where = "GPU RAM" if self.gpu else "RAM"
        return f"  {where} est {max(self.estimates):.0f} MiB, peak {max(self.peaks):.0f} MiB"


def label(fact: StoredFact) -> str:
    text = shown(fact.record.text)
    text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS] + "..."
    return f"fact {fact.id} ({text} -> {shown(fact.record.target)[:LABEL_CHARS]})"


def quarantine(session: Session, found: list[tuple[StoredFact, str]], out: BatchOutcome,
               echo: Callable[[str], None]) -> None:
    for fact, reason in found:
        session.ledger.quarantine([fact.id], reason)
        out.quarantined.append(fact.id)
        echo(f"quarantined {label(fact)}: {shown(reason)}")


def recheck(session: Session, facts: list[StoredFact]) -> tuple[list[StoredFact], list[tuple[StoredFact, str]]]:
    """(facts passing today's intake checks, (fact, reason) of those that do not)."""
    keep, bad = [], []
    for f in facts:
        problem = record_problem(f.record.model_dump(mode="json")) or session.limits.problem(f.record)
        if problem:
            bad.append((f, f"intake check: field '{problem[0]}': {problem[1]}"))
        else:
            keep.append(f)
    return keep, bad


def merge(out: BatchOutcome, got: BatchOutcome) -> None:
    out.committed += got.committed
    out.applied += got.applied
    out.failed += got.failed
    out.quarantined += got.quarantined
    out.deferred += got.deferred
    out.metrics = got.metrics if got.committed else out.metrics
    out.seconds += got.seconds


def apply_group(session: Session, group: list[StoredFact], estimate: float, defers: dict[int, int],
                max_defers: int, out: AdmittedOutcome) -> None:
    """`run_batch` on one group inside an attempt record, with its peak RAM measured and stored (on CUDA the
    model's GPUs' allocator peak, which the estimate is counted against; else the process's peak RSS)."""
    gpu = bool(cuda_devices(session.model))
    if gpu:
        reset_gpu_peak(session.model)
    else:
        reset_peak()
    with breaker.attempt(session.ledger, group):
        got = run_batch(session, group, defers, max_defers)
    peak = peak_gpu_mb(session.model) if gpu else peak_mb()
    for bid in got.committed:
        session.ledger.add_metrics(bid, RAM_PHASE, {"estimate_mb": estimate,
                                                    "peak_gpu_mb" if gpu else "peak_rss_mb": peak})
    merge(out, got)
    out.estimates.append(estimate)
    out.peaks.append(peak)
    out.gpu = gpu


def log_split(session: Session, split: Split) -> None:
    if len(split.groups) > 1:
        ids = [[f.id for f in g] for g in split.groups]
        where = "GPU RAM" if split.gpu else "RAM"
        session.ledger.log_event("split", f"{where}: {sum(map(len, ids))} facts applied as {len(ids)} batches to "
                                 f"stay within the budget of {split.limit_mb:.0f} MiB",
                                 data={"groups": ids, "estimates_mb": split.estimates})


def run_admitted(session: Session, facts: list[StoredFact], defers: dict[int, int], max_defers: int,
                 echo: Callable[[str], None]) -> AdmittedOutcome:
    """Apply a planned batch behind the checks, the breaker and the RAM budget (module docstring)."""
    out = AdmittedOutcome()
    breaker.recover(session.ledger)
    facts, bad = recheck(session, facts)
    quarantine(session, bad, out, echo)
    verdicts = breaker.judge(session.ledger, facts, session.cfg)
    quarantine(session, verdicts.quarantine, out, echo)
    budget = RamBudget(session)
    for split in (budget.split(verdicts.rest), budget.split(verdicts.alone, alone=True)):
        quarantine(session, split.too_big, out, echo)
        log_split(session, split)
        for group, estimate in zip(split.groups, split.estimates):
            apply_group(session, group, estimate, defers, max_defers, out)
    return out
