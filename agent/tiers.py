"""The two tiers seen from outside: which applied facts the weights answer with the memory off, and the export that
writes the weights tier (HF checkpoint or GGUF) with the memory tier and a manifest beside it.

A fact lives in the `memory` tier (an entity-memory slot answers it) or the `weights` tier (the MLP weights answer it
greedily with the memory off; `kagent consolidate` moves facts there). The export's manifest records both the ledger's
tier and what the exported weights answer when asked now, with no memory attached.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from editors.models import LoadedModel, source_gguf
from evaluators.scoring import greedy_matches
from memory.export import export
from memory.ledger import Ledger
from memory.record import StoredFact

log = logging.getLogger(__name__)


def weights_answer(model: nn.Module, tok, facts: Sequence[StoredFact]) -> dict[int, bool]:
    """Fact id -> does greedy decoding of `model` as it runs now begin with the fact's target (call it with the
    memory detached or suspended to ask the weights alone)."""
    if not facts:
        return {}
    hits = greedy_matches(model, tok, [f.record.text for f in facts], [f.record.target for f in facts])
    return {f.id: bool(h) for f, h in zip(facts, hits.tolist())}


def export_tiers(loaded: LoadedModel, ledger: Ledger, out_dir: Path, fmt: str, model_name: str,
                 gguf_type: str = "f32") -> tuple[Path, dict[int, bool]]:
    """`loaded` holds base + committed weight deltas and no memory: its answers are the weights tier's. Export it
    (a GGUF export starts from the file `model_name` was dequantised from); return the path and those answers."""
    answers = weights_answer(loaded.model, loaded.tok, ledger.facts(status="applied"))
    path = export(loaded.model, loaded.tok, ledger, out_dir, fmt, answers, source_gguf(model_name), gguf_type)
    log.info("export: the weights alone answer %d of %d applied fact(s)", sum(answers.values()), len(answers))
    return path, answers
