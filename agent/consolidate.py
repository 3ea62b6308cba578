"""`kagent consolidate` (and the end of `kagent refresh`): every live fact re-solved as one batch from the base
weights, committed as a batch of kind `consolidated` that replaces the chain of batches before it.

What is re-solved depends on where the editor writes (config `editor.write`):

- weights (`write = "weights"`): every applied fact's target value is optimised again on the base model and all of
  them are solved jointly from the base weights, keys read on the base model (D4S / NSE-style, `Editor.rebase`);
- entity memory (ENCORE's default): compaction (agent/compaction.py) moves the largest set of facts the damage budget
  allows into the weights by the same solve; a fact the weights answer with the memory off gets tier `weights` and
  gives up its slot, the others keep theirs (tier `memory`). With no set within budget, the chain's slots are merged
  into one write, without the slots of subjects no applied fact names any more (facts that failed).

The guard: the model with the consolidation is asked every applied fact (greedy) and probed (known facts, held-out
perplexity); when it answers fewer applied facts, fewer known facts, or its perplexity is more than
`PPL_TOLERANCE` above the chain's (a compaction: more than its `compact_*` budget), the chain is restored exactly and
kept (a `consolidate` event says why).
Rolling the consolidation back (`kagent rollback BATCH` or `--to` an earlier batch) recommits the chain bit for bit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from agent.batch import answered, dense
from agent.compaction import at_base_plus, compact, kept_slots
from agent.session import Session
from editors.core import EditResult
from editors.delta import EditDelta
from evaluators.monitors.memory_tier import memory_alarms, memory_monitors
from memory.model_sync import consolidate_applied
from memory.record import StoredFact

PPL_TOLERANCE = 0.01  # relative perplexity rise a consolidation may bring (measurement noise of the probe)


@dataclass
class Consolidation:
    """What `consolidate` did."""

    batch_id: int | None  # the consolidated batch; None when nothing was committed
    covers: list[int]  # batches it replaced (or would have)
    facts: int  # applied facts it holds
    kept_chain: str = ""  # why the chain was kept instead ("" when committed or nothing to do)
    metrics: dict[str, float] = field(default_factory=dict)  # before_* / after_* probe readings
    tiers: dict[str, int] = field(default_factory=dict)  # applied facts per tier after it (memory, weights)
    rounds: list[dict] = field(default_factory=list)  # a compaction's rounds (agent/compaction.py)

    def line(self) -> str:
        if self.batch_id is not None:
            split = f" ({self.tiers.get('weights', 0)} in the weights, {self.tiers.get('memory', 0)} in the memory)"
            return (f"consolidated batches {self.covers} into batch {self.batch_id}: {self.facts} applied fact(s)"
                    f"{split if self.tiers else ''}, {int(self.metrics['after_took'])} answer (were "
                    f"{int(self.metrics['before_took'])}), known facts {self.metrics.get('before_known_acc', 1):.3f}"
                    f" -> {self.metrics.get('after_known_acc', 1):.3f}, perplexity "
                    f"{self.metrics['before_perplexity']:.2f} -> {self.metrics['after_perplexity']:.2f}")
        return self.kept_chain


def memory_only(session: Session, live: list[StoredFact]) -> EditResult:
    """The chain's slots as one write (subjects of applied facts only) and its keys, concatenated (the session's
    prior keys: the committed batches' keys in order)."""
    memory = kept_slots(session.ledger.memory_write(), live, dict.fromkeys((f.id for f in live), "memory"))
    return EditResult(EditDelta([], memory), {l: dense(k) for l, k in session.prior_keys.items()}, [])


def solved(session: Session, live: list[StoredFact]) -> EditResult:
    """The consolidated delta, relative to the base weights (see the module docstring)."""
    if session.editor.hp.write == "memory":
        return memory_only(session, live)
    result = session.editor.rebase([f.record.to_request() for f in live], session.w0,
                                    progress=sys.stderr.isatty())
    result.keys = {l: dense(k) for l, k in result.keys.items()}
    return result


def reading(session: Session, live: list[StoredFact], prefix: str) -> dict[str, float]:
    took = sum(answered(session, live))
    return {f"{prefix}_took": float(took)} | {f"{prefix}_{k}": v for k, v in
                                               session.probes.downstream(session.model, session.tok).items()}


def worse(m: dict[str, float]) -> str:
    """Why the consolidated model probes worse than the chain ("" when it does not)."""
    if m["after_took"] < m["before_took"]:
        return f"it answers {int(m['after_took'])} applied facts, the chain {int(m['before_took'])}"
    if m.get("after_known_acc", 1.0) < m.get("before_known_acc", 1.0):
        return f"known-fact accuracy {m['after_known_acc']:.3f} < {m['before_known_acc']:.3f}"
    if m["after_perplexity"] > m["before_perplexity"] * (1 + PPL_TOLERANCE):
        return f"perplexity {m['after_perplexity']:.3f} > {m['before_perplexity']:.3f} (+{PPL_TOLERANCE:.0%})"
    return ""


def worse_compacted(m: dict[str, float], cfg) -> str:
    """Why the compacted model (both tiers on) is worse than the chain beyond the compaction budget ("" if not)."""
    if m["after_took"] < m["before_took"]:
        return f"it answers {int(m['after_took'])} applied facts, the chain {int(m['before_took'])}"
    if m.get("after_known_acc", 1.0) < m.get("before_known_acc", 1.0) - cfg.compact_known_drop - 1e-6:  # float32
        return f"known-fact accuracy {m['after_known_acc']:.3f} < {m['before_known_acc']:.3f} - {cfg.compact_known_drop}"
    if m["after_perplexity"] > m["before_perplexity"] * cfg.compact_ppl_ratio:
        return f"perplexity {m['after_perplexity']:.3f} > {m['before_perplexity']:.3f} x {cfg.compact_ppl_ratio}"
    return ""


def kept(session: Session, chain: list[int], live: list[StoredFact], why: str, metrics: dict,
         rounds: list[dict] | None = None) -> Consolidation:
    """The chain restored exactly and kept, with an event saying why."""
    session.restore()
    reason = f"kept the chain of batches {chain}: {why}"
    session.ledger.log_event("consolidate", reason, data={"covers": chain, "metrics": metrics, "rounds": rounds or []})
    return Consolidation(None, chain, len(live), reason, metrics, rounds=rounds or [])


def commit(session: Session, chain: list[int], live: list[StoredFact], delta: EditDelta, keys: dict,
           metrics: dict, tiers: dict[int, str] | None = None) -> int:
    """Record the consolidation (the model holds base + `delta`); on any failure the chain is restored."""
    try:
        bid = consolidate_applied(session.ledger, session.model, delta, keys, {"after": metrics}, session.cfg.method,
                                  tiers=tiers)
    except BaseException:
        session.restore()
        raise
    session.rebuild_state()
    session.probes.keep(None)
    return bid


def compact_memory(session: Session, chain: list[int], live: list[StoredFact], metrics: dict,
                   rounds: list[dict]) -> Consolidation | None:
    """Memory -> weights compaction (agent/compaction.py), guarded with both tiers on; None (model restored, a
    `compaction` event saying why, its rounds added to `rounds`) when no set of facts fits the damage budget."""
    t0 = time.perf_counter()
    before = {k.removeprefix("before_"): v for k, v in metrics.items()}
    try:
        plan = compact(session, live, before)
    except BaseException:
        session.restore()
        raise
    if plan.delta is None:
        rounds.extend(plan.rounds)
        session.restore()
        session.ledger.log_event("compaction", f"no fact moved into the weights: {plan.why_not}; the chain's slots "
                                 "are merged instead", data={"covers": chain, "rounds": plan.rounds})
        return None
    metrics |= reading(session, live, "after")
    why = worse_compacted(metrics, session.cfg)
    if why:
        return kept(session, chain, live, f"the compacted model probes worse ({why})", metrics, plan.rounds)
    counts = {t: sum(v == t for v in plan.tiers.values()) for t in ("weights", "memory")}
    metrics |= {"weights_tier": float(counts["weights"]), "memory_tier": float(counts["memory"]),
                "rounds": float(len(plan.rounds)), "compaction_seconds": time.perf_counter() - t0}
    metrics |= {f"after_{k}": plan.best[k] for k in ("norm_growth", "interference", "delta_ratio", "specificity",
                                                      "memory_specificity") if k in plan.best}
    metrics |= memory_monitors(session)  # the memory tier that stays (the model holds base + the compaction)
    for alarm in memory_alarms(metrics, session.cfg):
        session.ledger.log_event("monitor", f"memory tier after compaction: {alarm}", data={"covers": chain})
    bid = commit(session, chain, live, plan.delta, {l: dense(k) for l, k in plan.keys.items()}, metrics, plan.tiers)
    return Consolidation(bid, chain, len(live), "", metrics, counts, plan.rounds)


def consolidate(session: Session) -> Consolidation:
    """Re-solve every applied fact from the base weights (with the entity memory: compact as many as the damage
    budget allows into the weights); commit it when it probes no worse than the chain."""
    ledger = session.ledger
    chain = [b.id for b in ledger.history() if b.status == "committed"]
    live = ledger.facts(status="applied")
    if not chain or (len(chain) == 1 and ledger.batch(chain[0]).kind == "consolidated"):
        return Consolidation(None, chain, len(live), "nothing to consolidate: "
                             + ("no committed batch" if not chain else f"batch {chain[0]} is already one"))
    metrics, rounds = reading(session, live, "before"), []
    if session.editor.hp.write == "memory" and session.cfg.compact:
        done = compact_memory(session, chain, live, metrics, rounds)
        if done is not None:
            return done
    result = solved(session, live)
    result.delta.check_finite()
    at_base_plus(session, result.delta)
    metrics |= reading(session, live, "after")
    why = worse(metrics)
    if why:
        return kept(session, chain, live, f"the consolidated model probes worse ({why})", metrics, rounds)
    bid = commit(session, chain, live, result.delta, result.keys, metrics)
    return Consolidation(bid, chain, len(live), "", metrics, rounds=rounds)
