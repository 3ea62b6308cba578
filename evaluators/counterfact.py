"""CounterFact: loading records (EasyEdit's reduced schema), edit requests, and ES / PS / NS / Score.

Per record, with NLL = mean per-token NLL of " " + answer after a prompt:
- ES (efficacy): NLL(target_new) < NLL(ground_truth) on the edit prompt;
- PS (paraphrase): the same on the rephrase prompt;
- NS (neighbourhood): NLL(locality_ground_truth) < NLL(target_new) on the locality prompt;
- Score: harmonic mean of the mean ES, PS and NS.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.prompts import EditRequest
from evaluators.scoring import DEFAULT_BATCH, target_nll

log = logging.getLogger(__name__)


class CounterFactRecord(BaseModel):
    case_id: int  # CounterFact case id (train and val ids are disjoint)
    prompt: str  # edit prompt with the subject written in
    subject: str  # the entity whose fact is edited (appears verbatim in `prompt`)
    target_new: str  # the counterfactual answer to write
    ground_truth: str  # the true answer before the edit
    rephrase_prompt: str  # a paraphrase of the edit prompt (generalisation check)
    locality_prompt: str  # a neighbouring fact's prompt (must keep its answer)
    locality_ground_truth: str  # that neighbouring fact's answer

    def template(self) -> str:
        """The prompt with its first subject occurrence replaced by "{}"."""
        if self.subject not in self.prompt:
            raise ValueError(f"case {self.case_id}: subject {self.subject!r} not in prompt {self.prompt!r}")
        return self.prompt.replace(self.subject, "{}", 1)


class CounterFactResult(BaseModel):
    n: int  # records evaluated
    es: float  # efficacy: share of records with P(new) > P(true) on the edit prompt
    ps: float  # paraphrase: the same on the rephrase prompt
    ns: float  # neighbourhood: share of locality prompts still preferring their answer over target_new
    score: float  # harmonic mean of es, ps, ns
    case_ids: list[int]  # the records, in input order
    es_hits: list[bool]  # per-record efficacy
    ps_hits: list[bool]  # per-record paraphrase success
    ns_hits: list[bool]  # per-record neighbourhood kept
    es_margin: list[float]  # NLL(true) - NLL(new) on the edit prompt (> 0 means success)


def load_counterfact(path: str | Path, n: int | None = None) -> list[CounterFactRecord]:
    """Records from a CounterFact JSON file (a list of objects); the first `n` if given."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    records = [CounterFactRecord.model_validate(r) for r in (raw[:n] if n is not None else raw)]
    log.info("loaded %d CounterFact records from %s", len(records), path)
    return records


def feed_line(r: CounterFactRecord) -> dict:
    """The record as one line of a kagent feed: subject, prompt, target (target_new), old_target (ground_truth), its
    rephrase as a paraphrase, its locality prompt as a neighbour, id "cf-<case_id>"."""
    return {"subject": r.subject, "prompt": r.prompt, "target": r.target_new, "old_target": r.ground_truth,
            "paraphrases": [r.rephrase_prompt],
            "neighbors": [{"prompt": r.locality_prompt, "target": r.locality_ground_truth}],
            "id": f"cf-{r.case_id}", "source": "counterfact"}


def to_requests(records: Sequence[CounterFactRecord]) -> list[EditRequest]:
    """Edit requests: ("{}"-template of the prompt, subject, target_new)."""
    return [EditRequest(r.template(), r.subject, r.target_new) for r in records]


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (the convention for Score)."""
    if not values or min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if hits.numel() else 0.0


def _paired_nll(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[CounterFactRecord],
                batch_size: int, progress: bool) -> torch.Tensor:
    """NLLs of shape (6, n): [new, true] on the edit prompt, rephrase, locality (true = locality answer)."""
    groups = [
        ([r.prompt for r in records], [r.target_new for r in records]),
        ([r.prompt for r in records], [r.ground_truth for r in records]),
        ([r.rephrase_prompt for r in records], [r.target_new for r in records]),
        ([r.rephrase_prompt for r in records], [r.ground_truth for r in records]),
        ([r.locality_prompt for r in records], [r.target_new for r in records]),
        ([r.locality_prompt for r in records], [r.locality_ground_truth for r in records]),
    ]
    prompts = [p for g in groups for p in g[0]]
    answers = [a for g in groups for a in g[1]]
    return target_nll(model, tok, prompts, answers, batch_size, progress).view(6, len(records))


def evaluate_counterfact(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[CounterFactRecord],
                         batch_size: int = DEFAULT_BATCH, progress: bool = True) -> CounterFactResult:
    """ES / PS / NS / Score of the model on `records` (all six scorings in one batched pass)."""
    if not records:
        return CounterFactResult(n=0, es=0, ps=0, ns=0, score=0, case_ids=[], es_hits=[], ps_hits=[], ns_hits=[],
                                 es_margin=[])
    nll = _paired_nll(model, tok, records, batch_size, progress)
    return result_from_nll(nll, [r.case_id for r in records])


def result_from_nll(nll: torch.Tensor, case_ids: list[int]) -> CounterFactResult:
    """The metrics from a (6, n) NLL table laid out as in `_paired_nll`."""
    es, ps, ns = nll[0] < nll[1], nll[2] < nll[3], nll[5] < nll[4]
    rates = [_mean(es), _mean(ps), _mean(ns)]
    return CounterFactResult(
        n=len(case_ids), es=rates[0], ps=rates[1], ns=rates[2], score=harmonic_mean(rates), case_ids=case_ids,
        es_hits=es.tolist(), ps_hits=ps.tolist(), ns_hits=ns.tolist(), es_margin=(nll[1] - nll[0]).tolist(),
    )
