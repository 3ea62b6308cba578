"""Slow tier: a few CounterFact-style edits applied through the agent (init, watch, ledger) on the embedded SmolLM2,
exported with `kagent export`, then loaded back with nothing but transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.cli import cli
from editors.models import fingerprint, load_model
from memory.record import FactRecord

pytestmark = pytest.mark.slow

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"
N_FACTS = 3  # the first lines of the example feed: Eiffel Tower -> Rome, Statue of Liberty -> Tokyo, Big Ben -> Berlin


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@torch.no_grad()
def greedy(model, tok, prompt: str, n_tokens: int = 6) -> str:
    """Plain transformers greedy decoding: the continuation of `prompt` as text."""
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def test_export_loads_with_from_pretrained_and_answers_the_new_targets(tmp_path, user_cache):
    records = [FactRecord.model_validate_json(line) for line in FEED.read_text().splitlines()[:N_FACTS]]
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(r.to_json() + "\n" for r in records))
    base = load_model()
    before = {r.text: greedy(base.model, base.tok, r.text) for r in records}
    assert not any(ans.startswith(" " + r.target) for r, ans in zip(records, before.values()))  # all new to it

    ws = tmp_path / "ws"
    run("init", "--workspace", ws)
    summary = run("watch", feed, "--once", "--workspace", ws).strip().splitlines()[-1]
    assert summary.startswith(f"{N_FACTS} line(s): {N_FACTS} new fact(s)"), summary
    out = tmp_path / "edited-model"
    run("export", out, "--workspace", ws)

    manifest = json.loads((out / "manifest.json").read_text())
    listed = {(f["subject"], f["prompt"], f["target"]) for f in manifest["facts"]}
    assert listed == {(r.subject, r.prompt, r.target) for r in records}  # every fact was applied and is listed
    assert manifest["base_fingerprint"] == fingerprint(base.model)
    assert sum(b["n_facts"] for b in manifest["batches"]) == N_FACTS

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    answers = {r.text: greedy(model, tok, r.text) for r in records}
    for r in records:
        assert answers[r.text].startswith(" " + r.target), (r.text, before[r.text], answers[r.text])
    # what plain transformers says is what `kagent ask` (base weights + the ledger's deltas) says
    asked = run("ask", records[0].text, "--tokens", "6", "--workspace", ws)
    assert asked == records[0].text + answers[records[0].text] + "\n"
