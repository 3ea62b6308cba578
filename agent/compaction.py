"""Compaction: facts move from the entity memory (tier 1) into the MLP weights (tier 2) by ENCORE's norm-constrained
solve from the base weights (or, with `compact_solve = "nullspace"`, ENCORE's target values written by AlphaEdit's
null-space solve), as many as the damage budget allows.

Rounds: the candidate facts (every applied fact, those already in the weights included: the solve starts from the base
weights) are solved jointly (`Editor.rebase` with `write = "weights"`: target values optimised at the last edited
layer on the base model, cached between rounds), the memory is taken off and each fact is asked greedily. A round is
within budget when known-fact accuracy, held-out perplexity, norm growth and the predicted interference on the known-
fact probes' keys stay inside the `compact_*` thresholds of `config.toml` (and `interference_threshold`), and the
facts the weights answer keep their subject's other answers (the statements their batch's same-subject check stored)
on average as well as their slots did, within `compact_specificity_drop`; a fact whose own subject the weights change
more than its slot did does not count as answered. The next round keeps only the facts the weights answered (misses
add damage and answer nothing; over budget by specificity alone, the same) or, over budget, half of those; the round
within budget whose weights answer the most facts wins. Its answered facts get tier `weights` and give up their slot
when no other fact of the subject stays in memory; every other fact keeps its slot (tier `memory`). The result is
checked with both tiers on: every fact that answered before must still answer, else nothing is committed. Nothing
reaches the ledger before that: a failed or interrupted compaction leaves the chain as it was.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from agent.session import Session
from agent.tiers import weights_answer
from editors.alphaedit import nullspace_solve, stats_projection
from editors.arch import weight_view
from editors.core import EditResult
from editors.delta import EditDelta
from editors.entity_memory import MemoryWrite
from editors.registry import resolve_hparams
from evaluators.monitors.interference import predicted_interference
from evaluators.monitors.norms import norm_metrics
from evaluators.probes import same_subject
from memory.record import StoredFact

log = logging.getLogger(__name__)


@dataclass
class Round:
    """One joint solve of `facts` from the base weights and what the weights alone did with it."""

    facts: list[StoredFact]  # facts solved into the weights this round
    result: EditResult  # the weight delta (relative to the base weights) and its keys
    answers: dict[int, bool]  # fact id -> the weights answer it with the memory off (every applied fact)
    metrics: dict[str, float]  # damage readings of the weights alone
    kept: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)  # answering fact id -> its
    #   subject's specificity (same_subject.kept_by_fact) at its check, with the memory tier, and with these weights
    drop: float = 0.0  # compact_specificity_drop
    over: str = ""  # why the round is over the damage budget ("" = within)
    over_specificity: bool = False  # over the budget by same-subject specificity alone

    def specific(self, f: StoredFact) -> bool:
        """The weights change f's subject's other answers no more than its slot did (within `drop`)."""
        at_check, now = self.kept.get(f.id, (None, None))
        return at_check is None or now is None or now >= at_check - self.drop - 1e-9

    @property
    def answered(self) -> list[StoredFact]:
        """The facts the weights answer with the memory off and that keep their subject's other answers."""
        return [f for f in self.facts if self.answers[f.id] and self.specific(f)]


@dataclass
class Compaction:
    """What a compaction chose: the weights delta, the slots kept, each fact's tier, and its rounds."""

    delta: EditDelta | None  # weights + kept slots, relative to the base weights (None: nothing within budget)
    keys: dict[int, torch.Tensor]  # the weight solve's keys
    tiers: dict[int, str]  # fact id -> memory | weights
    rounds: list[dict] = field(default_factory=list)  # per round: facts, answered, over, metrics
    why_not: str = ""  # why nothing was chosen
    best: dict[str, float] = field(default_factory=dict)  # the chosen round's weights-alone readings


def at_base_plus(session: Session, delta: EditDelta) -> None:
    """The model = base weights + `delta` (weights and entity memory)."""
    with torch.no_grad():
        for layer, w in session.w0.items():
            view = weight_view(session.model, layer)
            view.copy_(w.to(view.device, view.dtype))
    delta.apply(session.model)
    session.editor.memory.load(delta.memory)


def nullspace_rule(session: Session):
    """AlphaEdit's null-space solve with AlphaEdit's settings for this model (threshold, ridge), for
    `Editor.solving_with`: the projector of each layer's base-key covariance is computed once per statistics."""
    hp = resolve_hparams("alphaedit", session.model.config).hparams
    stats = session.editor.stats

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:  # from the base: no earlier keys
        return nullspace_solve(stats_projection(stats[layer], hp.nullspace_threshold), K, hp.alphaedit_l2)

    return solve


def solve(session: Session, facts: list[StoredFact]) -> EditResult:
    """`facts` solved jointly into the weights from the base weights: target values by the session's method
    (ENCORE), the closed form by it or, with `compact_solve = "nullspace"`, by AlphaEdit's null-space projection."""
    rule = session.editor.solving_with(nullspace_rule(session)) if session.cfg.compact_solve == "nullspace" \
        else nullcontext()
    with session.editor.overriding(write="weights"), rule:
        return session.editor.rebase([f.record.to_request() for f in facts], session.w0,
                                     progress=sys.stderr.isatty())


def over_budget(session: Session, before: dict[str, float], m: dict[str, float]) -> str:
    """Why the weights-alone readings `m` exceed the compaction budget against the chain's `before` ("" if not)."""
    c = session.cfg
    if m.get("known_acc", 1.0) < before.get("known_acc", 1.0) - c.compact_known_drop - 1e-6:  # float32 shares
        return f"known facts {m['known_acc']:.3f} < {before['known_acc']:.3f} - {c.compact_known_drop}"
    if m["perplexity"] > before["perplexity"] * c.compact_ppl_ratio:
        return f"perplexity {m['perplexity']:.3f} > {before['perplexity']:.3f} x {c.compact_ppl_ratio}"
    if m.get("norm_growth", 1.0) > c.compact_norm_growth:
        return f"norm growth {m['norm_growth']:.4f} > {c.compact_norm_growth}"
    if m.get("interference", 0.0) > c.interference_threshold:
        return f"predicted interference {m['interference']:.4f} > {c.interference_threshold}"
    return ""


def specificity(session: Session, r: Round) -> None:
    """The same-subject specificity of the round's answering facts with the weights alone (`r.kept`, the round's
    `specificity` and `memory_specificity` means, and the over-budget reason when its mean is lower than the memory
    tier's by more than `compact_specificity_drop`)."""
    solved = [f for f in r.facts if r.answers[f.id]]
    r.kept = same_subject.kept_by_fact(session.model, session.tok, solved, session.ledger.probes())
    pairs = [v for v in r.kept.values() if None not in v]
    if not pairs:
        return
    r.metrics["memory_specificity"] = sum(m for m, _ in pairs) / len(pairs)
    r.metrics["specificity"] = sum(w for _, w in pairs) / len(pairs)
    r.metrics["unspecific"] = float(sum(not r.specific(f) for f in solved))
    limit = r.metrics["memory_specificity"] - r.drop
    if not r.over and r.metrics["specificity"] < limit - 1e-9:
        r.over, r.over_specificity = (f"same-subject specificity {r.metrics['specificity']:.3f} < the memory tier's "
                                      f"{r.metrics['memory_specificity']:.3f} - {r.drop}"), True


def run_round(session: Session, facts: list[StoredFact], live: list[StoredFact],
              before: dict[str, float]) -> Round:
    """Solve `facts`, put base + that delta (no memory) in the model, ask every live fact, probe the damage and
    the same-subject specificity of the facts that answer."""
    t0 = time.perf_counter()
    result = solve(session, facts)
    result.delta.check_finite()
    weights = EditDelta(result.delta.layers, None)
    interference = predicted_interference(session.model, weights, session.probe_keys()) if facts else 0.0
    at_base_plus(session, weights)
    answers = weights_answer(session.model, session.tok, live)
    norms = norm_metrics(session.model, session.w0, weights)
    growth = max((v for k, v in norms.items() if k.startswith("norm_ratio.")), default=1.0)
    metrics = session.probes.downstream(session.model, session.tok) | {
        "norm_growth": growth, "delta_ratio": norms["delta_ratio"], "interference": interference,
        "seconds": time.perf_counter() - t0}
    r = Round(facts, result, answers, metrics, drop=session.cfg.compact_specificity_drop)
    r.over = over_budget(session, before, metrics)
    specificity(session, r)
    log.info("compaction round: %d fact(s) solved, %d answer without the memory and keep their subject, known %.3f, "
             "perplexity %.2f, norm growth %.4f, same-subject specificity %.3f (memory tier %.3f)%s", len(facts),
             len(r.answered), metrics.get("known_acc", float("nan")), metrics["perplexity"], growth,
             metrics.get("specificity", float("nan")), metrics.get("memory_specificity", float("nan")),
             f"; over budget: {r.over}" if r.over else "")
    return r


def next_candidates(r: Round) -> list[StoredFact]:
    """Within budget, or over it by same-subject specificity alone: the facts the weights answered that keep their
    subject. Over it otherwise: the first half of those, at least one (or half of the round's facts, when all of them
    count)."""
    kept = r.answered
    if not r.over or r.over_specificity:
        return kept
    if len(kept) < len(r.facts):
        return kept[: max(1, len(kept) // 2)]  # a smaller set than this round's, even when one fact is all that counts
    return r.facts[: len(r.facts) // 2]


def choose(session: Session, live: list[StoredFact], before: dict[str, float]) -> tuple[Round | None, list[dict]]:
    """The rounds of the selection (module docstring); the best round within budget, or None."""
    facts, best, log_rows = list(live), None, []
    with tqdm(total=session.cfg.compact_rounds, desc="compaction rounds", unit="round", disable=None) as bar:
        for _ in range(session.cfg.compact_rounds):
            if not facts:
                break
            r = run_round(session, facts, live, before)
            log_rows.append({"facts": len(r.facts), "answered": len(r.answered), "over": r.over} | r.metrics)
            bar.update()
            bar.set_postfix(solved=len(r.facts), answer=len(r.answered), budget="over" if r.over else "ok")
            if not r.over and (best is None or len(r.answered) > len(best.answered)):
                best = r
            nxt = next_candidates(r)
            if not r.over and len(nxt) == len(r.facts):
                break  # every solved fact answers, within budget: a further round would solve the same set
            facts = nxt
    return best, log_rows


def kept_slots(chain: MemoryWrite | None, live: list[StoredFact], tiers: dict[int, str]) -> MemoryWrite | None:
    """The chain's slots of subjects that still have a fact in the memory tier."""
    if chain is None:
        return None
    needed = {f.record.subject for f in live if tiers[f.id] == "memory"}
    keep = [i for i, s in enumerate(chain.subjects) if s in needed]
    if not keep:
        return None
    subjects = [chain.subjects[i] for i in keep]
    gated = chain.keys is not None  # answer-site slots keep their keys and radii
    aliases = {s: a for s, a in chain.aliases.items() if s in subjects}
    return MemoryWrite(chain.layer, subjects, chain.deltas[keep], aliases,
                       chain.keys[keep] if gated else None, chain.radii[keep] if gated else None,
                       {s: a for s, a in chain.answers.items() if s in subjects})


def compact(session: Session, live: list[StoredFact], before: dict[str, float]) -> Compaction:
    """Choose the weights tier (module docstring); the model is left at base + the chosen delta (or as it was
    before, when nothing was chosen: the caller restores it from the ledger either way on failure)."""
    chain = session.ledger.memory_write()
    best, rows = choose(session, live, before)
    if best is None or not best.answered:
        why = "no round within the damage budget" if best is None else "the weights answer none of the facts"
        return Compaction(None, {}, {f.id: f.tier or "memory" for f in live}, rows, why)
    weights_tier = {f.id for f in best.answered}
    tiers = {f.id: "weights" if f.id in weights_tier else "memory" for f in live}
    delta = EditDelta(best.result.delta.layers, kept_slots(chain, live, tiers))
    at_base_plus(session, delta)
    return Compaction(delta, best.result.keys, tiers, rows, best=best.metrics)
