"""Export the edited model as a plain Hugging Face checkpoint plus a manifest of its facts.

The checkpoint loads with `AutoModelForCausalLM.from_pretrained`; `manifest.json` lists every
applied fact, the committed batches and the base model fingerprint, so a user can see what
the exported weights know that the base model did not.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from memory.ledger import Ledger

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def manifest(ledger: Ledger) -> dict:
    """The facts the model in use contains (applied), and the committed batches that put them there."""
    batches = [b for b in ledger.history() if b.status == "committed"]
    facts = [{"fact_id": f.id, "batch_id": f.batch_id, **f.record.model_dump(mode="json")}
             for f in ledger.facts(status="applied")]
    return {
        "format": "kagent-export/1",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_fingerprint": ledger.base_fingerprint(),
        "edited_layers": ledger.tracked_layers(),
        "batches": [{"id": b.id, "method": b.method, "n_facts": b.n_facts, "layers": b.layers,
                     "delta_hash": b.delta_hash, "created_at": b.created_at} for b in batches],
        "facts": facts,
    }


def export(model: nn.Module, tok: PreTrainedTokenizerBase, ledger: Ledger, out_dir: Path | str) -> Path:
    """Write model + tokenizer + manifest.json to `out_dir` (via a temp dir, then rename).

    Refuses (LedgerMismatch) when the model is not base + committed deltas, so the manifest
    always describes the exported weights.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} exists and is not empty")
    ledger.check_model(model)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest(ledger), indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("exported edited model with %d fact(s) to %s", len(ledger.facts(status="applied")), out)
    return out
