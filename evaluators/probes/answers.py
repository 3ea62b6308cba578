"""Greedy-answer probes: known-fact accuracy, retention of applied edits, and asking again only what changed.

- `known_fact_hits` / `known_fact_accuracy`: which (what share) of the shipped known facts (CounterFact val facts the
  unedited model gets right) greedy decoding still answers;
- `retention`: share of applied edit requests whose target is still the model's greedy answer;
- `asked_again`: per fact, its answer before a change where the change cannot have touched its text (greedy
  decoding reproduces it token for token), else asked now.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.prompts import EditRequest
from evaluators.probes.facts import KnownFact, load_known_facts
from evaluators.scoring import DEFAULT_BATCH, greedy_matches


def known_fact_hits(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact],
                    batch_size: int = DEFAULT_BATCH, progress: bool = False) -> torch.Tensor:
    """Per fact: does greedy decoding still start with " " + target? Bool tensor (n,)."""
    return greedy_matches(model, tok, [f.prompt for f in facts], [f.target for f in facts],
                          batch_size=batch_size, progress=progress)


def known_fact_accuracy(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact] | None = None,
                        batch_size: int = DEFAULT_BATCH, progress: bool = False) -> float:
    """Share of known facts still answered (the shipped probe set when `facts` is None)."""
    facts = load_known_facts() if facts is None else facts
    return float(known_fact_hits(model, tok, facts, batch_size, progress).float().mean()) if facts else 0.0


def retention(model: nn.Module, tok: PreTrainedTokenizerBase, applied_requests: Sequence[EditRequest],
              whole_answer: bool = False, batch_size: int = DEFAULT_BATCH, progress: bool = False) -> float:
    """Share of applied edits whose target is the greedy answer on the edit prompt.

    By default only the first target token must be the greedy next token; with `whole_answer`
    every target token must be (greedy decoding reproduces the whole target).
    """
    if not applied_requests:
        return 0.0
    hits = greedy_matches(model, tok, [r.text() for r in applied_requests], [r.target for r in applied_requests],
                          first_token_only=not whole_answer, batch_size=batch_size, progress=progress)
    return float(hits.float().mean())


def asked_again(before: torch.Tensor, texts: list[str], unchanged: Callable[[str], bool],
                ask: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Per fact, does the model answer it after a change that left `unchanged` texts bit for bit alone: `before`'s
    answer where the fact answered and its text (prompt and answer) is unchanged - greedy decoding reproduces it
    token for token - else `ask(indices)` of the others."""
    hits = before.clone()
    redo = [i for i, (hit, text) in enumerate(zip(before.tolist(), texts)) if not hit or not unchanged(text)]
    if redo:
        hits[redo] = ask(redo)
    return hits
