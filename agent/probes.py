"""Downstream probes measured after every batch, on top of evaluators.probes: known-fact accuracy, held-out
perplexity and retention of applied edits.

The suite fixes its inputs once (the first `probe_facts` known facts, a held-out text prefix long enough for
`probe_tokens` tokens) so every batch is measured on exactly the same data as the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from editors.corpus import heldout_text
from editors.prompts import EditRequest
from evaluators import probes
from evaluators.probes import KnownFact
from memory.record import FactRecord

CHARS_PER_TOKEN = 8  # generous: the text prefix cut for `probe_tokens` tokens always holds enough of them
WINDOW = 256  # perplexity window (tokens)


def requests(records: list[FactRecord]) -> list[EditRequest]:
    return [r.to_request() for r in records]


@dataclass
class ProbeSuite:
    known: list[KnownFact]  # facts the unedited model answers; they must keep being answered
    text: str  # held-out text for perplexity
    tokens: int  # tokens of `text` scored

    @classmethod
    def shipped(cls, n_known: int, n_tokens: int, probe_file: str = "") -> "ProbeSuite":
        known = probes.load_known_facts(probe_file or None)[:n_known]
        return cls(known, heldout_text()[: n_tokens * CHARS_PER_TOKEN], n_tokens)

    def downstream(self, model: nn.Module, tok) -> dict[str, float]:
        """known_acc (when there are known facts) and perplexity."""
        out = {"perplexity": probes.perplexity(model, tok, self.text, max_tokens=self.tokens,
                                               window=min(WINDOW, self.tokens))}
        if self.known:
            out["known_acc"] = probes.known_fact_accuracy(model, tok, self.known)
        return out

    def retention(self, model: nn.Module, tok, records: list[FactRecord]) -> float:
        """Share of `records` whose whole target is the greedy answer (0 for none: callers skip empty samples)."""
        return probes.retention(model, tok, requests(records), whole_answer=True)

    def key_requests(self) -> list[EditRequest]:
        return [EditRequest(k.prompt.replace(k.subject, "{}", 1), k.subject, k.target)
                for k in self.known if k.subject in k.prompt]
