"""Applying one batch under guard: compute, predict interference, apply, monitor, probe, commit or roll back.

`run_batch` hands `attempt` to `guard.bisect`: a group that passes is committed as its own ledger batch; a group
that fails is rolled back (the ledger restores the exact weights, the editor state loses its keys) and split.
Facts that fail on their own are quarantined (probe damage above the noise floor, perplexity, retention) or deferred
(predicted interference), with the reason.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass, field

from agent import guard
from agent.guard import Verdict
from agent.monitors import norm_metrics, predicted_interference, superposition_metrics, trend_metrics
from agent.probes import Reading
from agent.session import Session
from editors.core import EditResult
from editors.delta import NonFiniteDelta
from memory.record import StoredFact

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    committed: list[int] = field(default_factory=list)  # ledger batch ids
    applied: list[int] = field(default_factory=list)  # fact ids now applied
    quarantined: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # "after" metrics of the last committed group
    seconds: float = 0.0


def retention_sample(session: Session, exclude: set[int]) -> list[StoredFact]:
    applied = [f for f in session.ledger.facts(status="applied") if f.id not in exclude]
    rng = random.Random(session.cfg.seed + len(applied))
    return rng.sample(applied, min(len(applied), session.cfg.retention_sample))


def reference_keys(session: Session) -> dict:
    """Keys the batch must not move: probe facts' keys and earlier edits' keys, per edited layer."""
    import torch

    probe = session.probe_keys()
    return {l: torch.cat([k for k in (probe.get(l), session.prior_keys.get(l)) if k is not None], dim=1)
            for l in session.layers if probe.get(l) is not None or session.prior_keys.get(l) is not None}


def noise_floor(session: Session, result: EditResult, group: list[StoredFact], before: Reading):
    """Per probe fact, the margin drop random updates of the batch's size cause on the model before it."""
    seed = session.cfg.seed * 1_000_003 + min(f.id for f in group)
    return session.probes.floor(session.model, session.tok, before, result.delta, session.cfg.damage_draws, seed)


def measure(session: Session, result: EditResult, group: list[StoredFact], sample: list[StoredFact],
            before: Reading, floor) -> tuple[Reading, dict]:
    """Monitors and probes of the model with `result` applied (damage against `before` and the noise floor)."""
    m = norm_metrics(session.model, session.w0, result.delta)
    m |= trend_metrics(m, session.history_metrics(), session.cfg.flash_k)
    m |= superposition_metrics(result.keys, session.prior_keys, session.covariances())
    reading, damage = session.probes.damage(session.model, session.tok, before, floor)
    m |= damage | session.probes.known_acc(session.model, session.tok)
    if sample:
        m["retention"] = session.probes.retention(session.model, session.tok, [f.record for f in sample])
    m["efficacy"] = session.probes.retention(session.model, session.tok, [f.record for f in group])
    return reading, m


def compute(session: Session, group: list[StoredFact]) -> EditResult:
    result = session.editor.compute([f.record.to_request() for f in group], progress=sys.stderr.isatty())
    result.keys = {l: dense(k) for l, k in result.keys.items()}
    return result


def dense(t):
    """A copy with row-major strides (a (d, 1) transposed view keeps a stride the ledger's hashing rejects)."""
    return t.detach().cpu().reshape(-1).clone().view(t.shape)


def reject(session: Session, result: EditResult, kind: str, reason: str, metrics: dict) -> Verdict:
    session.ledger.restore(session.model)
    session.editor.state.add_keys(result.keys, sign=-1.0)
    return Verdict(False, kind, reason, metrics)


def attempt(session: Session, group: list[StoredFact]) -> Verdict:
    """Compute, check and (when every check passes) commit `group` as one batch."""
    ids = [f.id for f in group]
    try:
        result = compute(session, group)
        result.delta.check_finite()
    except NonFiniteDelta as exc:
        return Verdict(False, guard.NONFINITE, str(exc))
    interference = predicted_interference(session.model, result.delta, reference_keys(session))
    if interference > session.cfg.interference_threshold:
        reason = f"predicted interference {interference:.4f} > {session.cfg.interference_threshold}"
        session.ledger.log_event("split", f"facts {ids}: {reason}", data={"facts": ids, "interference": interference})
        return Verdict(False, guard.INTERFERENCE, reason, {"interference": interference})
    sample = retention_sample(session, set(ids))
    before = {"retention": session.probes.retention(session.model, session.tok, [f.record for f in sample])} \
        if sample else {}
    reference = session.probes.reference(session.model, session.tok)
    floor = noise_floor(session, result, group, reference)
    session.editor.apply(result)
    reading, after = measure(session, result, group, sample, reference, floor)
    after["interference"] = interference
    baseline = session.baseline()
    failures = guard.probe_failures(after, baseline.known_acc, baseline.perplexity,
                                    before.get("retention"), session.cfg)
    if failures:
        verdict = reject(session, result, guard.PROBE, "; ".join(failures), after)
        session.ledger.log_event("reject", f"rolled back facts {ids} before commit: {verdict.reason}",
                                 data={"facts": ids, "metrics": after})
        return verdict
    try:
        bid = session.ledger.commit(group, result.delta, result.keys, {"before": before, "after": after},
                                    session.cfg.method, session.model)
    except BaseException:  # not committed (e.g. disk full): model and editor state back to the ledger's
        session.ledger.restore(session.model)
        session.editor.state.add_keys(result.keys, sign=-1.0)
        raise
    session.add_prior_keys(result.keys)
    session.probes.keep(reading)
    if after.get("flash"):
        session.ledger.log_event("flash", f"batch {bid}: update size {after['delta_ratio']:.4g} is an outlier",
                                 bid, {"delta_ratio": after["delta_ratio"]})
    return Verdict(True, metrics=after | {"batch_id": float(bid)})


def settle(session: Session, rejected: list[tuple[StoredFact, Verdict]], out: BatchOutcome,
           defers: dict[int, int], max_defers: int) -> None:
    """Quarantine facts that damage the model on their own; defer (then quarantine) over-interfering ones."""
    for fact, verdict in rejected:
        if verdict.kind == guard.INTERFERENCE and defers.get(fact.id, 0) + 1 < max_defers:
            defers[fact.id] = defers.get(fact.id, 0) + 1
            session.ledger.log_event("defer", f"deferred fact {fact.id}: {verdict.reason}", data={"fact": fact.id})
            out.deferred.append(fact.id)
        else:
            session.ledger.quarantine([fact.id], f"{verdict.kind}: {verdict.reason}")
            out.quarantined.append(fact.id)


def run_batch(session: Session, facts: list[StoredFact], defers: dict[int, int], max_defers: int = 2) -> BatchOutcome:
    """Apply `facts` under guard; bisect on rejection. Every decision is a ledger event."""
    t0 = time.perf_counter()
    out = BatchOutcome()

    def tracked(group: list[StoredFact]) -> Verdict:
        verdict = attempt(session, group)
        if verdict.ok:
            out.committed.append(int(verdict.metrics["batch_id"]))
            out.applied += [f.id for f in group]
            out.metrics = verdict.metrics
        elif len(group) > 1:
            session.ledger.log_event("bisect", f"bisecting {len(group)} facts: {verdict.reason}",
                                     data={"facts": [f.id for f in group], "kind": verdict.kind})
        return verdict

    settle(session, guard.bisect(facts, tracked), out, defers, max_defers)
    out.seconds = time.perf_counter() - t0
    return out
