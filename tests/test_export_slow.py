"""Real-model export tests on the embedded SmolLM2: facts applied through the agent (init, watch), compacted into the
weights (`kagent consolidate`), exported with `kagent export`, then served with nothing but transformers (smoke tier)
or llama.cpp (slow tier, `llama-cpp-python`).

The weights tier is what a plain runtime serves: every fact the manifest lists as answering without the memory must
answer from plain `from_pretrained` + `generate`, and the GGUF in llama.cpp must answer the weights-tier facts at no
less than 95 % of the rate plain transformers gives (the edited tensors are F32; the rest keep the source's Q4_1,
which transformers dequantises exactly, while llama.cpp computes with the packed weights).
"""
from __future__ import annotations

import json
import logging

import pytest

from editors.entity_memory import load_exported
from memory.ledger import Ledger
from conftest import STATS_TOKENS
from test_smoke import answered, first_facts, greedy, load_export, run

log = logging.getLogger(__name__)

N_FACTS = 6  # the example feed's first lines: facts the base model does not know


@pytest.fixture(scope="module")
def compacted(real_model_home, tmp_path_factory):
    """A workspace with N_FACTS watched and compacted, and its HF export: (records, workspace, export dir)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAGENT_HOME", str(real_model_home))
        tmp = tmp_path_factory.mktemp("export")
        feed = first_facts(tmp, N_FACTS)
        ws = tmp / "ws"
        run("init", "--stats-tokens", STATS_TOKENS, "--workspace", ws)
        run("watch", feed, "--once", "--workspace", ws)
        log.info("%s", run("consolidate", "--workspace", ws).strip())
        out = tmp / "edited-model"
        run("export", out, "--workspace", ws)
        yield [json.loads(line) for line in feed.read_text().splitlines()], ws, out


@pytest.mark.smoke
def test_plain_from_pretrained_answers_the_weights_tier(compacted, user_cache):
    records, ws, out = compacted  # user_cache: `ask` below loads the model the workspace was built on
    manifest = json.loads((out / "manifest.json").read_text())
    with Ledger(ws / "ledger") as ledger:  # the export names the base model its workspace's ledger was built on
        assert manifest["base_fingerprint"] == ledger.base_fingerprint() is not None
    facts = manifest["facts"]
    assert {(f["subject"], f["target"]) for f in facts} <= {(r["subject"], r["target"]) for r in records}
    weights = [f for f in facts if f["tier"] == "weights"]
    assert weights, manifest["tiers"]  # a handful of facts fits the weights on this model (BENCHMARKS.md, two tiers)

    model, tok = load_export(out)
    plain = {f["text"]: greedy(model, tok, f["text"]) for f in facts}
    for f in facts:  # the manifest says what plain transformers answers
        assert answered(plain, f) == f["answers_without_memory"], (f["text"], plain)
    assert all(answered(plain, f) for f in weights), plain
    with load_exported(out, model, tok):  # both tiers: every applied fact
        both = {f["text"]: greedy(model, tok, f["text"]) for f in facts}
    assert all(answered(both, f) for f in facts), both
    asked = run("ask", facts[0]["text"], "--tokens", "6", "--workspace", ws)
    assert asked == facts[0]["text"] + both[facts[0]["text"]] + "\n"  # as `kagent ask` (both tiers) says


@pytest.mark.slow
def test_llama_cpp_answers_the_weights_tier_of_the_gguf_export(compacted, tmp_path, user_cache):
    llama_cpp = pytest.importorskip("llama_cpp")
    _records, ws, out = compacted  # user_cache: `export` loads the model the workspace was built on
    gguf_dir = tmp_path / "gguf"
    run("export", gguf_dir, "--format", "gguf", "--workspace", ws)
    manifest = json.loads((gguf_dir / "manifest.json").read_text())
    assert manifest["weights"]["replaced_tensors"]  # the edited ffn_down tensors, written as F32
    weights = [f for f in manifest["facts"] if f["tier"] == "weights"]
    llm = llama_cpp.Llama(model_path=str(gguf_dir / "model.gguf"), n_ctx=256, n_threads=2, verbose=False)
    said = {f["text"]: llm(f["text"], max_tokens=6, temperature=0.0)["choices"][0]["text"] for f in weights}
    model, tok = load_export(out)
    plain = sum(answered({f["text"]: greedy(model, tok, f["text"])}, f) for f in weights)
    cpp = sum(answered(said, f) for f in weights)
    log.info("weights tier: llama.cpp answers %d, transformers %d of %d facts", cpp, plain, len(weights))
    assert cpp >= 0.95 * plain, said
