"""Smoke tier (`-m smoke`, run by CI after the fast tier): the main job on the embedded SmolLM2 with default
settings but for fewer statistics tokens, end to end through the CLI — init, watch 10 facts, ask, export loaded by
plain transformers, rollback, verify. On a fresh machine this includes dequantising the GGUF and computing the
covariance statistics (see BENCHMARKS.md, "Smoke test"); it logs how long each step took."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.cli import cli
from editors.entity_memory import load_exported
from memory.record import FactRecord

pytestmark = pytest.mark.smoke
log = logging.getLogger(__name__)

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"
N_FACTS = 10  # the example feed's first ten lines: ten distinct facts the base model does not know
# Covariance statistics over 20,000 corpus tokens instead of the default 100,000: the same code path at a fifth of
# its cost, which on a fresh machine is most of the test's time (about 3 CPU-minutes at the default; see
# BENCHMARKS.md, "Smoke test")
STATS_TOKENS = 20_000


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@torch.no_grad()
def greedy(model, tok, prompt: str, n_tokens: int = 6) -> str:
    """Plain transformers greedy decoding (`generate`, KV cache) of exactly `n_tokens` tokens after `prompt`, as
    `kagent ask` decodes (without its end-of-text stop, which ask does not make either)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id or 0)
    return tok.decode(out[0, -n_tokens:], skip_special_tokens=True)


class Clock:
    """Seconds spent in each named step, in order."""

    def __init__(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = round(now - self.t, 1), now


def test_init_watch_ask_export_rollback_on_the_embedded_model(tmp_path, user_cache):
    clock = Clock()
    records = [FactRecord.model_validate_json(line) for line in FEED.read_text().splitlines()[:N_FACTS]]
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(r.to_json() + "\n" for r in records))
    ws = tmp_path / "ws"
    run("init", "--stats-tokens", STATS_TOKENS, "--workspace", ws)  # on a fresh machine: dequantise, statistics
    clock.lap("init")
    summary = run("watch", feed, "--once", "--workspace", ws).strip().splitlines()[-1]
    clock.lap("watch")
    assert summary.startswith(f"{N_FACTS} line(s): {N_FACTS} new fact(s)"), summary
    applied = json.loads(run("facts", "--status", "applied", "--json", "--workspace", ws))
    assert len(applied) >= N_FACTS // 2, summary  # most facts pass the guard and take

    out = tmp_path / "edited-model"
    run("export", out, "--workspace", ws)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with load_exported(out, model, tok):  # the export's entity memory (ENCORE's default write) attached
        answers = {f["text"]: greedy(model, tok, f["text"]) for f in applied}
    hits = sum(answers[f["text"]].startswith(" " + f["target"]) for f in applied)
    clock.lap("export")
    assert hits == len(applied), answers  # every applied fact was checked before commit: the export answers it
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f["fact_id"] for f in manifest["facts"]) == sorted(f["id"] for f in applied)

    first = applied[0]["text"]
    assert run("ask", first, "--tokens", "6", "--workspace", ws) == f"{first}{answers[first]}\n"  # as transformers
    clock.lap("ask")
    run("rollback", "--to", "0", "--workspace", ws)
    base, edited = run("ask", first, "--tokens", "6", "--base", "--workspace", ws).split("\nedited: ")
    assert base.removeprefix("base:   ") == edited.removesuffix("\n")  # back to the unedited model
    assert run("verify", "--workspace", ws).startswith("OK: ")
    clock.lap("rollback + verify")
    log.info("%s; export answers %d/%d applied facts with the new target; seconds: %s", summary, hits, len(applied),
             clock.laps)
