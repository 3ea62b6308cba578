"""Monitors of the memory tier: what the entity memory's slots do besides answering their facts.

- `memory_slots`: how many slots the memory holds;
- `memory_slot_norm` (max) and `memory_slot_norm_mean`: each slot's norm against the mean residual norm at the
  memory's layer on held-out text (a slot several times the residual stream's size overrides whatever the model
  computed there);
- `memory_fire_rate`: the share of held-out text lines (WikiText-2's held-out articles, which are about none of the
  edited facts) in which some slot fires, and `memory_fires_per_1k`: firings per 1,000 held-out tokens;
- `memory_collisions`: subjects whose token form lies inside another subject's (the shorter one's slot fires inside
  the longer name as well: "Paris" in "Paris Hilton"), and
  `memory_common`: subjects that fire in at least `common_share` of held-out lines (a common word: "Georgia",
  "Apple", "Python").

`HeldOut` tokenises the held-out lines and measures the residual norm once; `memory_health` is then a pass over
token ids with the memory's own matcher (no forward pass). `memory_monitors` reads them for an agent session (any
object with `editor.memory`, `model`, `tok` and a `held_out` attribute it may fill: agent/session.py's `Session`),
and `memory_alarms` says which are over their `config.toml` thresholds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from editors.corpus import heldout_text
from editors.entity_memory import EntityMemory, subject_variants
from evaluators.scoring import model_device

COMMON_SHARE = 0.01  # a subject firing in >= 1 % of held-out lines counts as a common word


@dataclass
class HeldOut:
    """Held-out text lines as token ids, and the mean residual norm at one layer's output over them."""

    lines: list[list[int]]  # token ids per line (no special tokens)
    residual_norm: float  # mean ||h|| at the layer's output over the first tokens of the text
    layer: int  # the layer that norm was measured at


@torch.no_grad()
def residual_norm(model: nn.Module, tok, text: str, layer: int, max_tokens: int = 512) -> float:
    """Mean L2 norm of `layer`'s output over the first `max_tokens` tokens of `text` (the memory suspended or
    detached: the caller's business)."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens].to(model_device(model))
    hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1]
    return float(hidden[0, 1:].float().norm(dim=-1).mean())  # the first position's norm is an outlier (sink)


def held_out(model: nn.Module, tok, text: str, layer: int, max_lines: int = 400) -> HeldOut:
    """`HeldOut` of the first `max_lines` non-empty, non-heading lines of `text`."""
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("=")][:max_lines]
    ids = [tok(l, add_special_tokens=False)["input_ids"] for l in lines]
    return HeldOut(ids, residual_norm(model, tok, "\n".join(lines), layer), layer)


def collisions(tok, subjects: list[str]) -> list[tuple[str, str]]:
    """(inner, outer) pairs: a token form of `inner` occurs inside a longer token form of `outer`."""
    forms = {s: subject_variants(tok, s) for s in subjects}
    inside: dict[tuple[int, ...], set[str]] = {}  # every proper contiguous part of a form -> subjects it is part of
    for outer, fs in forms.items():
        for f in fs:
            for i in range(len(f)):
                for j in range(i + 1, len(f) + 1):
                    if j - i < len(f):
                        inside.setdefault(f[i:j], set()).add(outer)
    return sorted({(inner, outer) for inner, fs in forms.items() for f in fs for outer in inside.get(f, ())
                   if outer != inner})


@dataclass
class MemoryHealth:
    metrics: dict[str, float]  # the monitors above
    firing: dict[str, int] = field(default_factory=dict)  # subject -> held-out lines it fired in (fired ones only)
    colliding: list[tuple[str, str]] = field(default_factory=list)  # (inner, outer) subject pairs
    common: list[str] = field(default_factory=list)  # subjects firing in >= COMMON_SHARE of the lines


def memory_health(memory: EntityMemory | None, text: HeldOut, common_share: float = COMMON_SHARE) -> MemoryHealth:
    """The memory tier's monitors (module docstring) on `text`."""
    if memory is None or not memory.slots:
        return MemoryHealth({"memory_slots": 0.0})
    norms = torch.stack(list(memory.slots.values())).float().norm(dim=1) / max(text.residual_norm, 1e-12)
    per_line = [{s for _, s in memory.matches(ids)} for ids in text.lines]
    firing = Counter(s for hit in per_line for s in hit)
    fires = sum(len(memory.matches(ids)) for ids in text.lines)
    tokens = max(sum(len(ids) for ids in text.lines), 1)
    n = max(len(text.lines), 1)
    common = sorted(s for s, c in firing.items() if c / n >= common_share)
    pairs = collisions(memory.tok, list(memory.slots))
    return MemoryHealth({"memory_slots": float(len(memory.slots)), "memory_slot_norm": float(norms.max()),
                         "memory_slot_norm_mean": float(norms.mean()),
                         "memory_fire_rate": sum(bool(h) for h in per_line) / n,
                         "memory_fires_per_1k": 1000.0 * fires / tokens,
                         "memory_collisions": float(len(pairs)), "memory_common": float(len(common))},
                        dict(firing), pairs, common)


def memory_monitors(session) -> dict[str, float]:
    """The memory tier's monitors (above) of the session's entity memory as it is now; the held-out lines and the
    residual norm at the memory's layer are measured once per session (memory off) and kept in `session.held_out`."""
    memory = session.editor.memory
    if session.held_out is None or session.held_out.layer != memory.layer:
        with memory.suspended():
            session.held_out = held_out(session.model, session.tok, heldout_text(), memory.layer)
    return memory_health(memory, session.held_out).metrics


def memory_alarms(metrics: dict[str, float], cfg) -> list[str]:
    """The memory monitors over their `config.toml` thresholds, as sentences (empty: all within)."""
    out = []
    if metrics.get("memory_slot_norm", 0.0) > cfg.memory_slot_norm_max:
        out.append(f"a slot's norm is {metrics['memory_slot_norm']:.2f}x the residual norm at its layer "
                   f"(memory_slot_norm_max {cfg.memory_slot_norm_max})")
    if metrics.get("memory_fire_rate", 0.0) > cfg.memory_fire_rate_max:
        out.append(f"slots fire in {metrics['memory_fire_rate']:.1%} of held-out lines "
                   f"(memory_fire_rate_max {cfg.memory_fire_rate_max:.1%})")
    return out
