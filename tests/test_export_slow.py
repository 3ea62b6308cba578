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
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.cli import cli
from editors.entity_memory import load_exported
from memory.ledger import Ledger
from memory.record import FactRecord

log = logging.getLogger(__name__)

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"
N_FACTS = 6  # the example feed's first lines: facts the base model does not know
STATS_TOKENS = 20_000  # as the smoke test: the same code path at a fifth of the statistics' cost


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@torch.no_grad()
def greedy(model, tok, prompt: str, n_tokens: int = 6) -> str:
    """Plain transformers greedy decoding: the continuation of `prompt` as text."""
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                         eos_token_id=None)  # exactly n_tokens, as `kagent ask` decodes
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    """A workspace with N_FACTS watched and compacted, and its HF export: (records, workspace, export dir, home)."""
    from conftest import USER_HOME, link_user_cache

    home = tmp_path_factory.mktemp("home")
    link_user_cache(home, USER_HOME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAGENT_HOME", str(home))
        tmp = tmp_path_factory.mktemp("export")
        records = [FactRecord.model_validate_json(line) for line in FEED.read_text().splitlines()[:N_FACTS]]
        feed = tmp / "feed.jsonl"
        feed.write_text("".join(r.to_json() + "\n" for r in records))
        ws = tmp / "ws"
        run("init", "--stats-tokens", STATS_TOKENS, "--workspace", ws)
        run("watch", feed, "--once", "--workspace", ws)
        log.info("%s", run("consolidate", "--workspace", ws).strip())
        out = tmp / "edited-model"
        run("export", out, "--workspace", ws)
        yield records, ws, out, home


@pytest.mark.smoke
def test_plain_from_pretrained_answers_the_weights_tier(compacted, monkeypatch):
    records, ws, out, home = compacted
    monkeypatch.setenv("KAGENT_HOME", str(home))  # `ask` below loads the model the workspace was built on
    manifest = json.loads((out / "manifest.json").read_text())
    with Ledger(ws / "ledger") as ledger:  # the export names the base model its workspace's ledger was built on
        assert manifest["base_fingerprint"] == ledger.base_fingerprint() is not None
    facts = manifest["facts"]
    assert {(f["subject"], f["target"]) for f in facts} <= {(r.subject, r.target) for r in records}
    weights = [f for f in facts if f["tier"] == "weights"]
    assert weights, manifest["tiers"]  # a handful of facts fits the weights on this model (BENCHMARKS.md, two tiers)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    plain = {f["text"]: greedy(model, tok, f["text"]) for f in facts}
    for f in facts:  # the manifest says what plain transformers answers
        assert plain[f["text"]].startswith(" " + f["target"]) == f["answers_without_memory"], (f["text"], plain)
    assert all(plain[f["text"]].startswith(" " + f["target"]) for f in weights), plain
    with load_exported(out, model, tok):  # both tiers: every applied fact
        both = {f["text"]: greedy(model, tok, f["text"]) for f in facts}
    assert all(both[f["text"]].startswith(" " + f["target"]) for f in facts), both
    asked = run("ask", facts[0]["text"], "--tokens", "6", "--workspace", ws)
    assert asked == facts[0]["text"] + both[facts[0]["text"]] + "\n"  # as `kagent ask` (both tiers) says


@pytest.mark.slow
def test_llama_cpp_answers_the_weights_tier_of_the_gguf_export(compacted, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    records, ws, out, _home = compacted
    gguf_dir = tmp_path / "gguf"
    run("export", gguf_dir, "--format", "gguf", "--workspace", ws)
    manifest = json.loads((gguf_dir / "manifest.json").read_text())
    assert manifest["weights"]["replaced_tensors"]  # the edited ffn_down tensors, written as F32
    weights = [f for f in manifest["facts"] if f["tier"] == "weights"]
    llm = llama_cpp.Llama(model_path=str(gguf_dir / "model.gguf"), n_ctx=256, n_threads=2, verbose=False)
    said = {f["text"]: llm(f["text"], max_tokens=6, temperature=0.0)["choices"][0]["text"] for f in weights}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    plain = sum(greedy(model, tok, f["text"]).startswith(" " + f["target"]) for f in weights)
    cpp = sum(said[f["text"]].startswith(" " + f["target"]) for f in weights)
    log.info("weights tier: llama.cpp answers %d, transformers %d of %d facts", cpp, plain, len(weights))
    assert cpp >= 0.95 * plain, said
