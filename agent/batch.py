"""Applying one batch under guard: compute, predict interference, apply, verify, monitor, probe, commit or roll back.

Verified application: after a group is applied, every fact is asked (greedy decoding of its prompt must begin with
its target, the check `kagent ask` and `kagent check` make). A fact that does not take is optimised again with
stronger settings (`stronger`), up to `max_tries` times; one that still does not take is committed with the batch
as `failed`, its reason naming the model's actual answer. Earlier facts of the retention sample that answered before
the batch and do not after it go back to pending ("re-queued").

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
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import guard
from agent.guard import Verdict
from agent.session import Session
from editors.core import EditResult
from editors.delta import NonFiniteDelta
from editors.delta import EditDelta
from editors.entity_memory import EntityMemory, MemoryWrite, merge_writes
from evaluators.monitors.interference import predicted_interference
from evaluators.monitors.memory_tier import memory_alarms, memory_monitors
from evaluators.monitors.norms import norm_metrics
from evaluators.monitors.superposition import superposition_metrics
from evaluators.monitors.trend import trend_metrics
from evaluators.probes import same_subject
from evaluators.probes.answers import asked_again
from evaluators.probes.suite import TOOK_PROBE, Reading
from evaluators.scoring import greedy_answers, greedy_matches
from memory.model_sync import commit_applied
from memory.record import StoredFact, normalise

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    committed: list[int] = field(default_factory=list)  # ledger batch ids
    applied: list[int] = field(default_factory=list)  # fact ids now applied (the model answers them)
    failed: list[int] = field(default_factory=list)  # fact ids committed but not taking after every try
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


def unchanged(session: Session, result: EditResult):
    """For a batch that only wrote entity-memory slots: a predicate telling which texts it cannot have changed
    (none of its subjects occurs in them: the model computes them bit for bit as before). None otherwise."""
    if result.delta.layers or result.delta.memory is None:
        return None
    new = EntityMemory.from_write(session.tok, result.delta.memory)
    return lambda text: not new.matches(session.tok(text)["input_ids"])


def noise_floor(session: Session, result: EditResult, group: list[StoredFact], before: Reading):
    """Per probe fact, the margin drop random updates of the batch's size cause on the model before it."""
    seed = session.cfg.seed * 1_000_003 + min(f.id for f in group)
    return session.probes.floor(session.model, session.tok, before, result.delta, session.cfg.damage_draws, seed)


def measure(session: Session, result: EditResult, group: list[StoredFact], sample: list[StoredFact],
            hits_before: list[bool], before: Reading, floor, took: int) -> tuple[Reading, dict, list[bool]]:
    """Monitors and probes of the model with `result` applied (damage against `before` and the noise floor);
    `took` facts of the group answer (verify asked them last). Also returns which sample facts answer (they answered
    `hits_before` before the batch)."""
    m = norm_metrics(session.model, session.w0, result.delta)
    m |= trend_metrics(m, session.history_metrics(), session.cfg.flash_k)
    m |= superposition_metrics(result.keys, session.prior_keys, session.covariances(), session.whitener)
    if result.delta.memory is not None:  # the memory tier's monitors (slots as they are with the batch applied)
        m |= memory_monitors(session)
        for alarm in memory_alarms(m, session.cfg):
            session.ledger.log_event("monitor", f"memory tier: {alarm}", data={"facts": [f.id for f in group]})
    same = unchanged(session, result)
    reading, damage = session.probes.damage(session.model, session.tok, before, floor, same)
    m |= damage | session.probes.known_acc(session.model, session.tok, reading, before, same)
    kept = answered(session, sample, hits_before, same)
    if sample:
        m["retention"] = share(kept)
    m["efficacy"] = took / len(group)
    return reading, m, kept


def share(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def companions(session: Session, group: list[StoredFact], also: list[StoredFact] = ()) -> list:
    """Requests an entity-memory slot must keep answering when `group` rewrites it: the applied facts about the
    same subjects (bar those a fact of the group supersedes) and `also` (group facts not being recomputed)."""
    if session.editor.hp.write != "memory":
        return []
    ids = {f.id for f in group}
    subjects = {f.record.subject for f in group}
    live = [f for f in session.ledger.unsettled_about({normalise(x) for x in subjects})
            if f.status == "applied" and f.id not in ids and f.record.subject in subjects]
    return [session.request(f) for f in [*live, *also] if f.record.subject in subjects and f.id not in ids]


def compute(session: Session, group: list[StoredFact], also: list[StoredFact] = ()) -> EditResult:
    result = session.editor.compute([session.request(f) for f in group], progress=sys.stderr.isatty(),
                                    companions=companions(session, group, also))
    result.keys = {l: dense(k) for l, k in result.keys.items()}
    return result


def dense(t):
    """A copy with row-major strides (a (d, 1) transposed view keeps a stride the ledger's hashing rejects)."""
    return t.detach().cpu().reshape(-1).clone().view(t.shape)


def answered(session: Session, facts: list[StoredFact], before: list[bool] | None = None,
             same: Callable[[str], bool] | None = None) -> list[bool]:
    """Per fact: does greedy decoding of its prompt begin with its target (what `kagent ask` shows)? With the
    answers `before` a slot-only batch and its `unchanged` predicate `same`, a fact that answered before and names
    no edited subject in its prompt or target is not asked again (the model reproduces it token for token)."""
    if before is not None and same is not None:
        import torch

        def ask(redo: list[int]) -> torch.Tensor:
            return torch.tensor(answered(session, [facts[i] for i in redo]), dtype=torch.bool)

        texts = [f"{f.record.text} {f.record.target}" for f in facts]
        return asked_again(torch.tensor(before, dtype=torch.bool), texts, same, ask).tolist()
    if not facts:
        return []
    return greedy_matches(session.model, session.tok, [f.record.text for f in facts],
                          [f.record.target for f in facts]).tolist()


def stronger(hp, tries: int) -> dict:
    """Settings for the `tries`-th retry of a fact that did not take: longer optimisation, a wider margin."""
    return {"max_steps": hp.max_steps * 2 ** tries, "mpes_patience": hp.mpes_patience + 2 * tries,
            "nll_stop": hp.nll_stop / 4 ** tries, "clamp_factor": hp.clamp_factor * (1 + 0.5 * tries)}


def combine(a: EditResult, b: EditResult) -> EditResult:
    """Two applied results as one batch: both deltas, both sets of keys."""
    import torch

    keys = {l: dense(torch.cat([k for k in (a.keys.get(l), b.keys.get(l)) if k is not None], 1))
            for l in a.keys.keys() | b.keys.keys()}
    return EditResult(a.delta.then(b.delta), keys, a.steps, a.seconds, a.flops + b.flops)


def verify(session: Session, group: list[StoredFact], result: EditResult) -> tuple[EditResult, dict[int, str]]:
    """Check every fact of the applied `result`; recompute the ones that did not take with stronger settings, up
    to `max_tries` value optimisations per fact. Returns the combined result and the reasons of facts that fail."""
    missed = [f for f, ok in zip(group, answered(session, group)) if not ok]
    for tries in range(1, session.cfg.max_tries):
        if not missed:
            break
        session.ledger.log_event("retry", f"{len(missed)} fact(s) did not take; optimising them again "
                                 f"(try {tries + 1} of {session.cfg.max_tries})", data={"facts": [f.id for f in missed]})
        others = [f for f in group if f not in missed]
        with session.editor.overriding(**stronger(session.editor.hp, tries)):
            extra = compute(session, missed, others)
        extra.delta.check_finite()
        session.editor.apply(extra)
        result = combine(result, extra)
        missed = [f for f, ok in zip(missed, answered(session, missed)) if not ok]
    says = greedy_answers(session.model, session.tok, [f.record.text for f in missed], 8)
    return result, {f.id: f"did not take after {session.cfg.max_tries} tries: the model answers {a.strip()!r}, "
                          f"not {f.record.target!r}" for f, a in zip(missed, says)}


def hold_subjects(session: Session, group: list[StoredFact], result: EditResult, failed: dict[int, str],
                  readings: dict[int, same_subject.SubjectReading]) -> tuple[EditResult, dict[int, str]]:
    """The same-subject check (evaluators/probes/same_subject.py): facts that change their subject's other answers
    are optimised again with a stronger hold, then failed with the changed answers quoted (and their slots dropped)."""
    floor = session.cfg.specificity_floor
    live = [f for f in group if f.id not in failed]
    moved = bool(result.delta.layers)
    same_subject.read_after(session, readings, [f.id for f in live], moved)
    bad, retried = same_subject.below_floor(readings, live, floor), []
    for tries in range(1, session.cfg.max_tries):
        if not bad:
            break
        session.ledger.log_event("retry", f"{len(bad)} fact(s) changed their subject's other answers; optimising "
                                 f"them again with a stronger hold (try {tries + 1} of {session.cfg.max_tries})",
                                 data={"facts": [f.id for f in bad]})
        hp = session.editor.hp
        with session.editor.overriding(keep_factor=max(hp.keep_factor, 0.25) * 4 ** tries,  # subject-site slots
                                       answer_margin=1 - (1 - hp.answer_margin) / 2 ** tries,  # answer-site: tighter
                                       answer_recall=False):  # and keyed only, not firing on the old answer
            extra = compute(session, bad, [f for f in group if f not in bad])
        extra.delta.check_finite()
        session.editor.apply(extra)
        result, retried = combine(result, extra), retried + bad
        same_subject.read_after(session, readings, [f.id for f in bad], moved or bool(extra.delta.layers))
        bad = same_subject.below_floor(readings, bad, floor)
    failed = dict(failed) | {f.id: same_subject.reason(readings[f.id]) for f in bad}
    again = [f for f in {f.id: f for f in retried}.values() if f.id not in failed]  # a fact is not hashable
    for f, ok in zip(again, answered(session, again)):
        if not ok:
            failed[f.id] = f"did not take with its subject's other answers held: the model answers " \
                           f"{greedy_answers(session.model, session.tok, [f.record.text], 8)[0].strip()!r}"
    return drop_slots(session, group, result, failed), failed


def drop_slots(session: Session, group: list[StoredFact], result: EditResult, failed: dict[int, str]) -> EditResult:
    """The result without the memory slots of subjects whose every fact in `group` failed the same-subject check
    (a slot that changes its subject and does not answer helps no one); the memory is reloaded to match."""
    memory = result.delta.memory
    dead = {f.record.subject for f in group if f.id in failed} - {f.record.subject for f in group if f.id not in failed}
    dead = {s for s in dead if any(f.id in failed and "subject's other answers" in failed[f.id]
                                   for f in group if f.record.subject == s)}
    if memory is None or not dead & set(memory.subjects):
        return result
    keep = [i for i, s in enumerate(memory.subjects) if s not in dead]
    keys = (memory.keys[keep], memory.radii[keep]) if memory.keys is not None else (None, None)
    write = MemoryWrite(memory.layer, [memory.subjects[i] for i in keep], memory.deltas[keep],
                        {s: a for s, a in memory.aliases.items() if s not in dead}, *keys,
                        {s: a for s, a in memory.answers.items() if s not in dead}) if keep else None
    result.delta = EditDelta(result.delta.layers, write)
    session.editor.memory.load(merge_writes([session.ledger.memory_write(), write]))
    return result


def reject(session: Session, result: EditResult, kind: str, reason: str, metrics: dict) -> Verdict:
    session.restore()
    session.editor.state.add_keys(result.keys, sign=-1.0)
    return Verdict(False, kind, reason, metrics)


def requeue(session: Session, sample: list[StoredFact], before: list[bool], after: list[bool],
            batch_id: int) -> list[int]:
    """Earlier facts that answered before batch `batch_id` and do not after it go back to pending."""
    lost = [f for f, was, now in zip(sample, before, after) if was and not now]
    if lost:
        ids = [f.id for f in lost]
        session.ledger.set_status(ids, "pending", f"stopped answering after batch {batch_id}; re-queued")
        session.ledger.log_event("requeue", f"{len(ids)} earlier fact(s) stopped answering after batch {batch_id}; "
                                 "re-queued", batch_id, {"facts": ids})
    return [f.id for f in lost]


def attempt(session: Session, group: list[StoredFact]) -> Verdict:
    """Compute, apply, verify (with retries), check and - when the probes pass - commit `group` as one batch."""
    ids = [f.id for f in group]
    clock = [time.perf_counter()]
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
    hits_before = answered(session, sample)
    before = {"retention": share(hits_before)} if sample else {}
    reference = session.probes.reference(session.model, session.tok)
    floor = noise_floor(session, result, group, reference) if result.delta.layers else None  # slots: no weights move
    readings = same_subject.read_before(session, group)
    clock.append(time.perf_counter())
    session.editor.apply(result)
    try:
        result, failed = verify(session, group, result)
        result, failed = hold_subjects(session, group, result, failed, readings)
    except NonFiniteDelta as exc:
        return reject(session, result, guard.NONFINITE, str(exc), {})
    clock.append(time.perf_counter())
    reading, after, hits_after = measure(session, result, group, sample, hits_before, reference, floor,
                                         len(group) - len(failed))
    clock.append(time.perf_counter())
    after |= {"interference": interference, "took": len(group) - len(failed), "failed": len(failed),
              "seconds_compute": clock[1] - clock[0], "seconds_verify": clock[2] - clock[1],
              "seconds_probes": clock[3] - clock[2]}
    baseline = session.baseline()
    failures = guard.probe_failures(after, baseline.known_acc, baseline.perplexity,
                                    before.get("retention"), session.cfg)
    if failures:
        verdict = reject(session, result, guard.PROBE, "; ".join(failures), after)
        session.ledger.log_event("reject", f"rolled back facts {ids} before commit: {verdict.reason}",
                                 data={"facts": ids, "metrics": after})
        return verdict
    try:
        bid = commit_applied(session.ledger, session.model, group, result.delta, result.keys,
                             {"before": before, "after": after}, session.cfg.method, failed=failed)
    except BaseException:  # not committed (e.g. disk full): model, memory and editor state back to the ledger's
        session.restore()
        session.editor.state.add_keys(result.keys, sign=-1.0)
        raise
    session.add_prior_keys(result.keys)
    session.probes.keep(reading)
    session.ledger.add_probes(bid, [{"fact_id": f.id, "kind": TOOK_PROBE, "prompt": f.record.text,
                                     "expected": f.record.target, "output": failed.get(f.id),
                                     "correct": f.id not in failed} for f in group] + same_subject.probe_rows(group, readings))
    if failed:
        session.ledger.log_event("failed", f"batch {bid}: {len(failed)} fact(s) did not take", bid,
                                 {"facts": list(failed)})
    requeue(session, sample, hits_before, hits_after, bid)
    if after.get("flash"):
        session.ledger.log_event("flash", f"batch {bid}: update size {after['delta_ratio']:.4g} is an outlier",
                                 bid, {"delta_ratio": after["delta_ratio"]})
    return Verdict(True, metrics=after | {"batch_id": float(bid), "failed_ids": failed})


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
            failed = verdict.metrics.pop("failed_ids")
            out.committed.append(int(verdict.metrics["batch_id"]))
            out.applied += [f.id for f in group if f.id not in failed]
            out.failed += list(failed)
            out.metrics = verdict.metrics
        elif len(group) > 1:
            session.ledger.log_event("bisect", f"bisecting {len(group)} facts: {verdict.reason}",
                                     data={"facts": [f.id for f in group], "kind": verdict.kind})
        return verdict

    settle(session, guard.bisect(facts, tracked), out, defers, max_defers)
    out.seconds = time.perf_counter() - t0
    return out
