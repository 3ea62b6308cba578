"""`kagent consolidate` (and the end of `kagent refresh`): every live fact re-solved as one batch from the base
weights, committed as a batch of kind `consolidated` that replaces the chain of batches before it.

What is re-solved depends on where the editor writes (config `editor.write`):

- weights (`write = "weights"`): every applied fact's target value is optimised again on the base model and all of
  them are solved jointly from the base weights, keys read on the base model (D4S / NSE-style, `Editor.rebase`);
- entity memory (ENCORE's default): slot values were optimised on the base model already, so the chain's slots are
  merged into one write, without the slots of subjects no applied fact names any more (facts that failed).

The guard: the model with the consolidation is asked every applied fact (greedy) and probed (known facts, held-out
perplexity); when it answers fewer applied facts, fewer known facts, or its perplexity is more than
`PPL_TOLERANCE` above the chain's, the chain is restored exactly and kept (a `consolidate` event says why).
Rolling the consolidation back (`kagent rollback BATCH` or `--to` an earlier batch) recommits the chain bit for bit.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from agent import batch
from agent.batch import dense
from agent.session import Session
from editors.arch import weight_view
from editors.core import EditResult
from editors.delta import EditDelta
from editors.entity_memory import MemoryWrite
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

    def line(self) -> str:
        if self.batch_id is not None:
            return (f"consolidated batches {self.covers} into batch {self.batch_id}: {self.facts} applied fact(s), "
                    f"{int(self.metrics['after_took'])} answer (were {int(self.metrics['before_took'])}), "
                    f"perplexity {self.metrics['before_perplexity']:.2f} -> {self.metrics['after_perplexity']:.2f}")
        return self.kept_chain


def memory_only(session: Session, live: list[StoredFact]) -> EditResult:
    """The chain's slots as one write (subjects of applied facts only) and its keys, concatenated (the session's
    prior keys: the committed batches' keys in order)."""
    write = session.ledger.memory_write()
    subjects = {f.record.subject for f in live}
    keep = [i for i, s in enumerate(write.subjects) if s in subjects] if write is not None else []
    memory = MemoryWrite(write.layer, [write.subjects[i] for i in keep], write.deltas[keep]) if keep else None
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
    took = sum(batch.answered(session, live))  # looked up on the module: the fast tests stand in for it
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


def at_base_plus(session: Session, delta: EditDelta) -> None:
    """The model = base weights + `delta` (weights and entity memory): what the ledger will hold once committed."""
    with torch.no_grad():
        for layer, w in session.w0.items():
            view = weight_view(session.model, layer)
            view.copy_(w.to(view.device, view.dtype))
    delta.apply(session.model)
    session.editor.memory.load(delta.memory)


def consolidate(session: Session) -> Consolidation:
    """Re-solve every applied fact from the base weights; commit it when it probes no worse than the chain."""
    ledger = session.ledger
    chain = [b.id for b in ledger.history() if b.status == "committed"]
    live = ledger.facts(status="applied")
    if not chain or (len(chain) == 1 and ledger.batch(chain[0]).kind == "consolidated"):
        return Consolidation(None, chain, len(live), "nothing to consolidate: "
                             + ("no committed batch" if not chain else f"batch {chain[0]} is already one"))
    metrics = reading(session, live, "before")
    result = solved(session, live)
    result.delta.check_finite()
    at_base_plus(session, result.delta)
    metrics |= reading(session, live, "after")
    why = worse(metrics)
    if why:
        session.restore()
        reason = f"kept the chain of batches {chain}: the consolidated model probes worse ({why})"
        ledger.log_event("consolidate", reason, data={"covers": chain, "metrics": metrics})
        return Consolidation(None, chain, len(live), reason, metrics)
    try:
        bid = ledger.consolidate(result.delta, result.keys, {"after": metrics}, session.cfg.method, session.model)
    except BaseException:
        session.restore()
        raise
    session.rebuild_state()
    session.probes.keep(None)
    return Consolidation(bid, chain, len(live), "", metrics)
