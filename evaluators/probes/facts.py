"""The shipped probe sets, and the benchmark records they reserve.

- `load_known_facts`: CounterFact val facts the unedited model answers (`known_facts.jsonl`); known-fact accuracy is
  measured over them;
- `load_probe_facts`: the guard's probe facts (`probe_facts.jsonl`: facts the unedited model answers, from
  CounterFact val, reserved CounterFact train records and zsRE), whose margins the damage measure reads;
- `reserved`: the records that hold probe facts, which no benchmark edits.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from pydantic import BaseModel

KNOWN_FACTS_FILE = "known_facts.jsonl"
PROBE_FACTS_FILE = "probe_facts.jsonl"
CF_VAL, CF_TRAIN, ZSRE = "counterfact-val", "counterfact-train", "zsre-train-1k"  # ProbeFact.dataset values


class KnownFact(BaseModel):
    prompt: str  # the prompt with the subject written in
    subject: str  # the entity the fact is about
    target: str  # the answer the unedited model gives (no leading space)
    case_id: int  # the CounterFact val record it comes from
    source: str = "prompt"  # which prompt of that record: "prompt", "rephrase" or "locality"


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """The probe set: the shipped file by default, else the JSONL file at `path`."""
    shipped = files("evaluators") / "data" / KNOWN_FACTS_FILE
    text = (Path(path) if path else shipped).read_text(encoding="utf-8")
    return [KnownFact.model_validate_json(line) for line in text.splitlines() if line.strip()]


class ProbeFact(BaseModel):
    prompt: str  # the prompt with the subject written in
    subject: str  # the entity the fact is about ("" for a question without one)
    target: str  # the answer the unedited model gives greedily (no leading space)
    dataset: str  # CF_VAL, CF_TRAIN (reserved records only, scripts/build_probes.py) or ZSRE
    record: int  # CounterFact case id, or the record's index in the zsRE file
    source: str  # which prompt of the record: prompt, rephrase, locality (CounterFact); src, rephrase (zsRE)
    margin: float  # the unedited model's margin (`fact_margins`) when the set was built, for reference


def load_probe_facts(path: str | Path | None = None) -> list[ProbeFact]:
    """The guard's probe set: the shipped `probe_facts.jsonl` by default, else the JSONL file at `path`."""
    shipped = files("evaluators") / "data" / PROBE_FACTS_FILE
    text = (Path(path) if path else shipped).read_text(encoding="utf-8")
    return [ProbeFact.model_validate_json(line) for line in text.splitlines() if line.strip()]


def reserved(dataset: str, facts: Sequence[ProbeFact] | None = None) -> set[int]:
    """Records of `dataset` that hold probe facts (CounterFact case ids, zsRE positions): no benchmark edits them.
    For "counterfact" the case ids of both CounterFact files (their ids are disjoint)."""
    facts = load_probe_facts() if facts is None else facts
    names = (CF_VAL, CF_TRAIN) if dataset == "counterfact" else (dataset,)
    return {f.record for f in facts if f.dataset in names}
