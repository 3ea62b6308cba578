"""zsRE (MEND split): loading records, edit requests, and token-level accuracy metrics.

Per record (teacher-forced, " " + answer after the question):
- edit accuracy: fraction of the new answer's (`alt`) tokens that are the argmax on `src`;
- rephrase accuracy: the same on `rephrase`;
- locality: fraction of `loc_ans` token positions after `loc` whose argmax is unchanged from the
  unedited model (pass the pre-edit predictions from `locality_predictions`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.prompts import EditRequest
from evaluators.scoring import DEFAULT_BATCH, answer_token_ids, teacher_forced_argmax

log = logging.getLogger(__name__)


class ZsreRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    subject: str  # the entity the question is about
    src: str  # the edit question
    rephrase: str  # a paraphrase of the question
    alt: str  # the new answer to write
    loc: str  # an unrelated (NQ) question for locality
    loc_ans: str  # its answer, scored teacher-forced for locality
    answers: list[str] = []  # the question's true answers (the probe set's zsRE facts use the first)

    def template(self) -> str | None:
        """`src` with the subject replaced by "{}", or None when the subject is not in it."""
        return self.src.replace(self.subject, "{}", 1) if self.subject in self.src else None


class ZsreResult(BaseModel):
    n: int  # records evaluated
    edit_acc: float  # mean token accuracy of `alt` on `src`
    rephrase_acc: float  # mean token accuracy of `alt` on `rephrase`
    locality: float  # mean share of `loc_ans` argmax tokens unchanged by the edits
    edit_hits: list[float]  # per-record token accuracy on `src`
    rephrase_hits: list[float]  # per-record token accuracy on `rephrase`
    locality_kept: list[float]  # per-record share of unchanged locality tokens


@dataclass
class ZsreEdits:
    records: list[ZsreRecord]  # records that could be turned into requests (aligned with `requests`)
    requests: list[EditRequest]  # one edit request per kept record
    skipped: int  # records dropped because the subject is not in `src`


def load_zsre(path: str | Path, n: int | None = None) -> list[ZsreRecord]:
    """Records from a zsRE JSON file (a list of objects); the first `n` if given."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    records = [ZsreRecord.model_validate(r) for r in (raw[:n] if n is not None else raw)]
    log.info("loaded %d zsRE records from %s", len(records), path)
    return records


def to_requests(records: Sequence[ZsreRecord]) -> ZsreEdits:
    """Edit requests (src template, subject, alt); records without the subject in `src` are skipped."""
    kept = [r for r in records if r.template() is not None]
    skipped = len(records) - len(kept)
    if skipped:
        log.warning("skipped %d of %d zsRE records whose subject is not in the question", skipped, len(records))
    return ZsreEdits(kept, [EditRequest(r.template() or "", r.subject, r.alt) for r in kept], skipped)


def locality_predictions(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[ZsreRecord],
                         batch_size: int = DEFAULT_BATCH, progress: bool = False) -> list[torch.Tensor]:
    """Argmax tokens at each `loc_ans` position after `loc` (take these from the unedited model)."""
    return teacher_forced_argmax(model, tok, [r.loc for r in records], [r.loc_ans for r in records],
                                 batch_size, progress)


def _accuracy(tops: Sequence[torch.Tensor], gold: Sequence[torch.Tensor]) -> list[float]:
    return [float((t == g).float().mean()) for t, g in zip(tops, gold)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def evaluate_zsre(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[ZsreRecord],
                  pre_locality: Sequence[torch.Tensor], batch_size: int = DEFAULT_BATCH,
                  progress: bool = True) -> ZsreResult:
    """Edit / rephrase token accuracy of `alt` and locality against the pre-edit predictions."""
    if len(pre_locality) != len(records):
        raise ValueError(f"{len(pre_locality)} pre-edit locality predictions for {len(records)} records")
    n = len(records)
    prompts = [r.src for r in records] + [r.rephrase for r in records] + [r.loc for r in records]
    answers = [r.alt for r in records] * 2 + [r.loc_ans for r in records]
    tops = teacher_forced_argmax(model, tok, prompts, answers, batch_size, progress)
    alt_ids = answer_token_ids(tok, [r.alt for r in records])
    edit, reph = _accuracy(tops[:n], alt_ids), _accuracy(tops[n: 2 * n], alt_ids)
    kept = _accuracy(tops[2 * n:], pre_locality)
    return ZsreResult(n=n, edit_acc=_mean(edit), rephrase_acc=_mean(reph), locality=_mean(kept),
                      edit_hits=edit, rephrase_hits=reph, locality_kept=kept)
