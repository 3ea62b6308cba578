"""Guarding commits: probe thresholds relative to the baseline, and bisection of a rejected batch.

`bisect` is generic: it takes the facts and an `attempt` callable that computes, checks and (on success) commits a
group of facts, returning a Verdict. A rejected group is split in halves and each half attempted on its own, down to
single facts; the facts that fail alone are returned with their verdicts so the caller can quarantine or defer them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from agent.config import AgentConfig

T = TypeVar("T")

INTERFERENCE = "interference"  # predicted before applying: the group is split, a single fact deferred
PROBE = "probe"  # measured after applying: the group is rolled back and bisected, a single fact quarantined
NONFINITE = "nonfinite"  # the editor produced NaN/Inf: treated like a probe failure


@dataclass
class Verdict:
    ok: bool
    kind: str = ""  # INTERFERENCE | PROBE | NONFINITE when not ok
    reason: str = ""  # one line, stored in the ledger
    metrics: dict[str, float] = field(default_factory=dict)


def probe_failures(after: dict[str, float], baseline_acc: float | None, baseline_ppl: float,
                   retention_before: float | None, cfg: AgentConfig) -> list[str]:
    """Why the probes say the model degraded (empty when it did not): damage above the noise floor first, then
    perplexity against the baseline, retention of earlier edits and (when enabled) known-fact accuracy."""
    out = damage_failures(after, cfg)
    if baseline_acc is not None and "known_acc" in after and after["known_acc"] < baseline_acc - cfg.known_acc_drop:
        out.append(f"known-fact accuracy {after['known_acc']:.3f} < baseline {baseline_acc:.3f} - {cfg.known_acc_drop}")
    if "perplexity" in after and not after["perplexity"] <= baseline_ppl * cfg.ppl_ratio:
        ppl = after["perplexity"]
        shown = f"{ppl:.2f}" if math.isfinite(ppl) else f"is not finite ({ppl})"
        out.append(f"perplexity {shown} > {cfg.ppl_ratio} x baseline {baseline_ppl:.2f}")
    if retention_before is not None and "retention" in after and \
            after["retention"] < retention_before - cfg.retention_drop:
        out.append(f"retention {after['retention']:.3f} < {retention_before:.3f} - {cfg.retention_drop}")
    return out


def damage_failures(after: dict[str, float], cfg: AgentConfig) -> list[str]:
    """The probe facts lost more margin than random updates of the batch's size take: by more than damage_z standard
    errors of the paired difference and more than damage_tolerance; not finite counts as damage."""
    if "excess" not in after:
        return []
    excess, se = after["excess"], after.get("excess_se", 0.0)
    if excess <= max(cfg.damage_z * se, cfg.damage_tolerance):
        return []
    return [f"probe damage {after.get('damage', excess):.3f} > noise floor {after.get('floor', 0.0):.3f} "
            f"by {excess:.3f} (> {cfg.damage_z} x se {se:.3f} and > {cfg.damage_tolerance})"]


def bisect(facts: Sequence[T], attempt: Callable[[list[T]], Verdict]) -> list[tuple[T, Verdict]]:
    """Attempt `facts` together; on rejection attempt each half. Returns the facts that fail on their own."""
    group = list(facts)
    verdict = attempt(group)
    if verdict.ok:
        return []
    if len(group) == 1:
        return [(group[0], verdict)]
    mid = len(group) // 2
    return bisect(group[:mid], attempt) + bisect(group[mid:], attempt)
