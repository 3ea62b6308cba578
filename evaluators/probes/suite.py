"""The probe suite measured after every batch: the damage measure (margin drop over the guard's probe facts against
the model just before the batch, and the same for random updates of the batch's size: the noise floor), held-out
perplexity, known-fact accuracy and retention of applied edits (the modules beside this one measure them).

The suite fixes its inputs once (the guard's probe facts, the first `probe_facts` known facts, a held-out text prefix
long enough for `probe_tokens` tokens) so every batch is measured on exactly the same data. Every reading runs the
model forward as it stands, hooks included. `reference` is the reading of the model before a batch: the one `keep`
stored after the last committed batch (a rejected batch is restored exactly, so it stays valid), else measured.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from editors.corpus import heldout_text
from editors.delta import EditDelta
from editors.prompts import EditRequest
from evaluators.probes.answers import asked_again, known_fact_hits, retention
from evaluators.probes.damage import damage as paired_damage
from evaluators.probes.damage import fact_margins, random_drops
from evaluators.probes.facts import KnownFact, ProbeFact, load_known_facts, load_probe_facts
from evaluators.probes.perplexity import perplexity as text_perplexity
from memory.record import FactRecord

TOOK_PROBE = "rewrite"  # probes-table kind whose `correct` says the greedy answer to the fact's prompt is its target

CHARS_PER_TOKEN = 8  # generous: the text prefix cut for `probe_tokens` tokens always holds enough of them
WINDOW = 256  # perplexity window (tokens)


def requests(records: list[FactRecord]) -> list[EditRequest]:
    return [r.to_request() for r in records]


@dataclass
class Reading:
    """The probes' view of one model state."""

    margins: torch.Tensor  # (n,) float64 margins of the guard's probe facts
    perplexity: float  # held-out perplexity
    known: torch.Tensor | None = None  # (k,) bool: which known facts the model answers (None: not asked yet)


@dataclass
class ProbeSuite:
    known: list[KnownFact]  # facts the unedited model answers; accuracy over them is reported
    text: str  # held-out text for perplexity
    tokens: int  # tokens of `text` scored
    facts: list[ProbeFact] = field(default_factory=list)  # the guard's probe facts (damage measure)
    _kept: Reading | None = None  # the reading after the last committed batch

    @classmethod
    def shipped(cls, n_known: int, n_tokens: int, probe_file: str = "", damage_file: str = "",
                n_damage: int = 0) -> "ProbeSuite":
        known = load_known_facts(probe_file or None)[:n_known]
        facts = load_probe_facts(damage_file or None)
        return cls(known, heldout_text()[: n_tokens * CHARS_PER_TOKEN], n_tokens, facts[:n_damage] if n_damage else facts)

    def perplexity(self, model: nn.Module, tok) -> float:
        return text_perplexity(model, tok, self.text, max_tokens=self.tokens, window=min(WINDOW, self.tokens))

    def read(self, model: nn.Module, tok, before: Reading | None = None,
             unchanged: Callable[[str], bool] | None = None) -> Reading:
        """Margins and perplexity of the model as it is now. With `before` and `unchanged` (a predicate on texts
        the change since `before` cannot have touched, e.g. no edited subject occurs in them), only the other
        facts and text are measured again and the rest is taken from `before` (it is bit for bit the same)."""
        if before is None or unchanged is None:
            return Reading(fact_margins(model, tok, self.facts), self.perplexity(model, tok))
        margins = before.margins.clone()
        redo = [i for i, f in enumerate(self.facts) if not unchanged(f"{f.prompt} {f.target}")]
        if redo:
            margins[redo] = fact_margins(model, tok, [self.facts[i] for i in redo])
        ppl = before.perplexity if unchanged(self.text) else self.perplexity(model, tok)
        return Reading(margins, ppl)

    def reference(self, model: nn.Module, tok) -> Reading:
        """The reading of the model before a batch: the kept one, else measured now (and kept)."""
        if self._kept is None:
            self._kept = self.read(model, tok)
        return self._kept

    def keep(self, reading: Reading | None) -> None:
        """Record `reading` as the model's current one (after a commit); None forgets it (the model changed)."""
        self._kept = reading

    def floor(self, model: nn.Module, tok, before: Reading, delta: EditDelta, draws: int, seed: int) -> torch.Tensor:
        """Per probe fact, the margin drop random updates of `delta`'s size cause (see `random_drops`)."""
        return random_drops(model, tok, self.facts, before.margins, delta, draws, seed)

    def downstream(self, model: nn.Module, tok) -> dict[str, float]:
        """perplexity and known_acc (when there are known facts) of the model as it is."""
        out = {"perplexity": self.perplexity(model, tok)}
        return out | self.known_acc(model, tok)

    def known_acc(self, model: nn.Module, tok, into: Reading | None = None, before: Reading | None = None,
                  unchanged: Callable[[str], bool] | None = None) -> dict[str, float]:
        """known_acc of the model as it is (stored in `into`'s reading when given). With `before` (holding the known
        facts' answers before the change) and `unchanged`, a fact answered before whose prompt and answer name no
        edited subject is not asked again: greedy decoding reproduces the answer token for token."""
        if not self.known:
            return {}
        if before is None or before.known is None or unchanged is None:
            hits = known_fact_hits(model, tok, self.known)
        else:
            hits = asked_again(before.known, [f"{k.prompt} {k.target}" for k in self.known], unchanged,
                               lambda redo: known_fact_hits(model, tok, [self.known[i] for i in redo]))
        if into is not None:
            into.known = hits
        return {"known_acc": float(hits.float().mean())}

    def damage(self, model: nn.Module, tok, before: Reading, floor: torch.Tensor | None,
               unchanged: Callable[[str], bool] | None = None) -> tuple[Reading, dict]:
        """The reading after a batch and its metrics: perplexity, ppl_before, damage (mean margin drop) and its
        standard error, and with a floor: floor (mean random drop) and excess = damage - floor with its paired
        standard error."""
        after = self.read(model, tok, before, unchanged)
        drops = before.margins - after.margins
        dmg = paired_damage(before.margins, after.margins)
        out = {"perplexity": after.perplexity, "ppl_before": before.perplexity, "damage": dmg.mean,
               "damage_se": dmg.se}
        if floor is not None:
            excess = paired_damage(drops, floor)  # mean of (drop - random drop), paired per fact
            out |= {"floor": float(floor.mean()), "excess": excess.mean, "excess_se": excess.se}
        elif unchanged is not None:  # slots only: facts without an edited subject are exact, so there is no noise
            out |= {"floor": 0.0, "excess": dmg.mean, "excess_se": dmg.se}
        return after, out

    def retention(self, model: nn.Module, tok, records: list[FactRecord]) -> float:
        """Share of `records` whose whole target is the greedy answer (0 for none: callers skip empty samples)."""
        return retention(model, tok, requests(records), whole_answer=True)

    def key_requests(self) -> list[EditRequest]:
        return [EditRequest(k.prompt.replace(k.subject, "{}", 1), k.subject, k.target)
                for k in self.known if k.subject in k.prompt]
