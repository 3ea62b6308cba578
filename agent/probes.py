"""Downstream probes measured after every batch: known-fact accuracy, held-out perplexity, retention of edits.

The known-fact probe set ships with evaluators (facts the unedited model answers correctly); perplexity runs on
passages of the held-out part of the shipped corpus; retention is the share of a sample of applied facts the
model still answers with their target (greedy decoding starts with " " + target).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from editors.prompts import EditRequest
from evaluators.corpus import data_path, heldout_text
from evaluators.scoring import greedy_matches, model_device
from memory.record import FactRecord

KNOWN_FACTS_FILE = "known_facts.jsonl"
PASSAGE_TOKENS = 128  # tokens per perplexity passage
MIN_PASSAGE_CHARS = 400


@dataclass(frozen=True)
class KnownFact:
    prompt: str  # prompt with the subject written in
    subject: str
    target: str  # the answer the unedited model gives

    def request(self) -> EditRequest:
        return EditRequest(self.prompt.replace(self.subject, "{}", 1), self.subject, self.target)


def load_known_facts(limit: int) -> list[KnownFact]:
    """The first `limit` facts of the shipped probe set (empty when it is not shipped)."""
    path = data_path(KNOWN_FACTS_FILE)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [KnownFact(r["prompt"], r["subject"], r["target"]) for r in rows[:limit]]


def heldout_passages(n: int) -> list[str]:
    """The first `n` paragraphs of the held-out text that are long enough to measure perplexity on."""
    paras = [p.strip() for p in heldout_text().split("\n") if len(p.strip()) >= MIN_PASSAGE_CHARS]
    return paras[:n]


@torch.no_grad()
def perplexity(model: nn.Module, tok, texts: list[str], max_tokens: int = PASSAGE_TOKENS) -> float:
    """exp(mean token NLL) over `texts`, each truncated to `max_tokens` tokens."""
    device = model_device(model)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids.to(device)
        if ids.shape[1] < 2:
            continue
        out = model(input_ids=ids, labels=ids)
        n = ids.shape[1] - 1
        nll += float(out.loss) * n
        count += n
    return math.exp(nll / count) if count else float("nan")


def retention(model: nn.Module, tok, records: list[FactRecord]) -> float:
    """Share of `records` whose prompt the model completes with " " + target (1.0 for none)."""
    if not records:
        return 1.0
    hits = greedy_matches(model, tok, [r.text for r in records], [r.target for r in records])
    return float(hits.float().mean())


@dataclass
class ProbeSuite:
    known: list[KnownFact]
    texts: list[str]

    @classmethod
    def shipped(cls, n_known: int, n_texts: int) -> "ProbeSuite":
        return cls(load_known_facts(n_known), heldout_passages(n_texts))

    def downstream(self, model: nn.Module, tok) -> dict[str, float]:
        """known_acc (when the probe set is shipped) and perplexity."""
        out = {"perplexity": perplexity(model, tok, self.texts)}
        if self.known:
            hits = greedy_matches(model, tok, [k.prompt for k in self.known], [k.target for k in self.known])
            out["known_acc"] = float(hits.float().mean())
        return out

    def retention(self, model: nn.Module, tok, records: list[FactRecord]) -> float:
        return retention(model, tok, records)

    def key_requests(self) -> list[EditRequest]:
        return [k.request() for k in self.known if k.subject in k.prompt]
