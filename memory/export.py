"""Export the two tiers: the weights tier as a plain Hugging Face checkpoint (or GGUF), the memory tier beside it,
and a manifest of which fact lives where.

The checkpoint loads with `AutoModelForCausalLM.from_pretrained` (`--format gguf`: `model.gguf`, served by llama.cpp;
memory/gguf_export.py); `manifest.json` lists every applied fact with its tier (`weights`: the weights answer it,
`memory`: an entity-memory slot does) and whether the exported weights alone answer it greedily
(`answers_without_memory`, measured by the caller with the memory off), the committed batches and the base model
fingerprint. The memory tier lives in `entity_memory.safetensors`; `editors.entity_memory.load_exported(dir, model,
tok)` attaches it to the loaded model (a plain `from_pretrained` or llama.cpp answers the weights tier alone).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.entity_memory import EXPORT_FILE
from memory.gguf_export import export_gguf
from memory.ledger import Ledger
from memory.model_sync import check_model

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
GGUF_FILE = "model.gguf"


def manifest(ledger: Ledger, answers: Mapping[int, bool] | None = None) -> dict:
    """The facts the model in use contains (applied) with their tier and, when `answers` (fact id -> the weights
    answer it with the memory off) is given, whether the exported weights alone answer them; the committed batches
    that put them there."""
    batches = [b for b in ledger.history() if b.status == "committed"]
    facts = [{"fact_id": f.id, "batch_id": f.batch_id, "tier": f.tier, "text": f.record.text,
              **f.record.model_dump(mode="json")}
             | ({"answers_without_memory": bool(answers[f.id])} if answers is not None and f.id in answers else {})
             for f in ledger.facts(status="applied")]
    tiers = {t: sum(f["tier"] == t for f in facts) for t in ("weights", "memory")}
    return {
        "format": "kagent-export/2",
        "tiers": tiers | ({"answer_without_memory": sum(bool(v) for v in answers.values())} if answers else {}),
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


def write_weights(model: nn.Module, tok: PreTrainedTokenizerBase, ledger: Ledger, tmp: Path, fmt: str,
                  gguf_source: Path | None, gguf_type: str) -> dict:
    """The weights tier into `tmp`: an HF checkpoint (fmt "hf") or `model.gguf` (fmt "gguf"); what the manifest says."""
    if fmt == "gguf":
        replaced = export_gguf(model, ledger.tracked_layers(), gguf_source, tmp / GGUF_FILE, gguf_type)
        return {"weights": {"format": "gguf", "file": GGUF_FILE, "source": gguf_source.name if gguf_source else None,
                            "replaced_tensors": replaced, "replaced_type": gguf_type}}
    if fmt != "hf":
        raise ValueError(f"export format {fmt!r}: choose hf or gguf")
    with without_gguf_marker(model):
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return {"weights": {"format": "hf"}}


def export(model: nn.Module, tok: PreTrainedTokenizerBase, ledger: Ledger, out_dir: Path | str, fmt: str = "hf",
           answers: Mapping[int, bool] | None = None, gguf_source: Path | None = None, gguf_type: str = "f32") -> Path:
    """Write the weights tier (`fmt`: hf checkpoint + tokenizer, or gguf), the memory tier and manifest.json to
    `out_dir` (via a temp dir, then rename).

    Refuses (LedgerMismatch) when the model is not base + committed deltas, so the manifest
    always describes the exported weights.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} exists and is not empty")
    check_model(ledger, model)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = write_weights(model, tok, ledger, tmp, fmt, gguf_source, gguf_type)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = manifest(ledger, answers) | weights
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
