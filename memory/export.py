"""Export the edited model as a plain Hugging Face checkpoint plus a manifest of its facts.

The checkpoint loads with `AutoModelForCausalLM.from_pretrained`; `manifest.json` lists every
applied fact, the committed batches and the base model fingerprint, so a user can see what
the exported weights know that the base model did not. Facts written to the entity memory (ENCORE's default)
live beside the weights in `entity_memory.safetensors`; `editors.entity_memory.load_exported(dir, model, tok)`
attaches them to the loaded model (a plain `from_pretrained` alone answers only the weight-written facts).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.entity_memory import EXPORT_FILE
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


def quant_method(model: nn.Module) -> str | None:
    """The quantization method named in the model's config ("gguf", ...), or None."""
    qcfg = getattr(model.config, "quantization_config", None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


@contextmanager
def without_gguf_marker(model: nn.Module) -> Iterator[None]:
    """Hide a GGUF quantizer record from a model whose weights are plain float tensors, while saving it.

    The embedded SmolLM2 is dequantised from GGUF once and cached with `quantization_config: gguf` still in its
    config.json, so every load of it carries transformers' GGUF quantizer although nothing is quantized, and
    `save_pretrained` refuses such a model ("quantized with gguf and is not serializable"). The export is a plain
    float checkpoint, so it is written without that record. The model gets it back afterwards: its config (and
    with it `editors.models.fingerprint`, which the ledger and the statistics cache are keyed by) is unchanged.
    """
    if quant_method(model) != "gguf" or not all(p.dtype.is_floating_point for p in model.parameters()):
        yield
        return
    quantizer, qcfg = getattr(model, "hf_quantizer", None), model.config.quantization_config
    model.hf_quantizer = None
    del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        model.config.quantization_config = qcfg


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
    with without_gguf_marker(model):
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = manifest(ledger)
    memory = ledger.memory_write()
    if memory is not None:
        save_file(memory.tensors(), str(tmp / EXPORT_FILE))
        info["entity_memory"] = {"file": EXPORT_FILE, "layer": memory.layer, "subjects": len(memory.subjects),
                                 "load": "with editors.entity_memory.load_exported(dir, model, tok): ..."}
    (tmp / MANIFEST).write_text(json.dumps(info, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("exported edited model with %d fact(s) to %s", len(ledger.facts(status="applied")), out)
    return out
