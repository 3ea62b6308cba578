"""Smoke tier (`-m smoke`, run by CI after the fast tier): the main job on the embedded SmolLM2 end to end through
the CLI, once per write mode of ENCORE - the entity memory (the default) and the weight solve (`write = "weights"` in
config.toml): init, watch a few facts, `kagent check`, export loaded by plain transformers and asked with `generate`
(KV cache), ask, rollback, verify, and an export after the rollback holding the base weights bit for bit.

Settings are the defaults but for fewer statistics tokens (conftest.STATS_TOKENS). The tests share one KAGENT_HOME
(conftest.real_model_home): on a fresh machine the first dequantises the GGUF and computes the covariance statistics
(see BENCHMARKS.md, "Smoke test"), the others reuse them. Each logs how long each step took."""
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
from conftest import STATS_TOKENS
from editors.entity_memory import EXPORT_FILE, load_exported
from editors.models import load_model
from memory.record import FactRecord

pytestmark = pytest.mark.smoke
log = logging.getLogger(__name__)

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"


def run(*args, code: int = 0) -> str:
    """`kagent ARGS` in this process; its stdout, after checking its exit code."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.stdout


def first_facts(tmp_path: Path, n: int) -> Path:
    """A feed of the example feed's first `n` lines (distinct facts the base model does not know)."""
    records = [FactRecord.model_validate_json(line) for line in FEED.read_text().splitlines()[:n]]
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(r.to_json() + "\n" for r in records))
    return feed


def set_editor(ws: Path, **settings: str) -> None:
    """Edit the workspace's config.toml as a user would: `editor = {}` -> `editor = {KEY = "VALUE", ...}`."""
    path = ws / "config.toml"
    text = path.read_text()
    assert text.count("\neditor = {}\n") == 1, text
    table = ", ".join(f'{key} = "{value}"' for key, value in settings.items())
    path.write_text(text.replace("\neditor = {}\n", f"\neditor = {{{table}}}\n"))


@torch.no_grad()
def greedy(model, tok, prompt: str, n_tokens: int = 6) -> str:
    """Plain transformers greedy decoding (`generate`, KV cache) of exactly `n_tokens` tokens after `prompt`, as
    `kagent ask` decodes (without its end-of-text stop, which ask does not make either)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id or 0)
    return tok.decode(out[0, -n_tokens:], skip_special_tokens=True)


def answered(answers: dict[str, str], fact: dict) -> bool:
    """Does the continuation of the fact's prompt begin with its target (as `kagent check` asks)?"""
    return answers[fact["text"]].startswith(" " + fact["target"])


def load_export(out: Path):
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


class Clock:
    """Seconds spent in each named step, in order."""

    def __init__(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = round(now - self.t, 1), now


def assert_base_weights(out: Path) -> None:
    """The export at `out` holds no fact, no memory tier, and exactly the unedited model's weights."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["facts"] == [] and not (out / EXPORT_FILE).exists(), manifest
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = load_model().model.state_dict()
    assert exported.keys() == base.keys()
    changed = [name for name, w in base.items() if not torch.equal(exported[name], w)]
    assert not changed, changed


# (write mode, facts watched): the memory takes ten at once; the weight solve gets three, to stay in CI's time: its
# target values are optimised at layer 7 (the memory's at 17), through more blocks, and its batch of four took 317 s
# of compute on the two shared cores
MODES = [("memory", 10), ("weights", 3)]


@pytest.mark.parametrize("write,n_facts", MODES, ids=[m for m, _ in MODES])
def test_watch_check_export_rollback_on_the_embedded_model(write, n_facts, tmp_path, user_cache):
    clock = Clock()
    ws = tmp_path / "ws"
    run("init", "--stats-tokens", STATS_TOKENS, "--workspace", ws)
    if write != "memory":
        set_editor(ws, write=write)
    clock.lap("init")
    summary = run("watch", first_facts(tmp_path, n_facts), "--once", "--workspace", ws).strip().splitlines()[-1]
    clock.lap("watch")
    assert summary.startswith(f"{n_facts} line(s): {n_facts} new fact(s)"), summary
    applied = json.loads(run("facts", "--status", "applied", "--json", "--workspace", ws))
    assert len(applied) >= n_facts // 2, summary  # most facts pass the guard and take
    assert {f["tier"] for f in applied} == {write}, applied
    checked = json.loads(run("check", "--json", "--workspace", ws))  # exit 0: every applied fact answers
    assert sorted(r["fact"] for r in checked) == sorted(f["id"] for f in applied)
    clock.lap("check")

    out = tmp_path / "edited-model"
    run("export", out, "--workspace", ws)
    manifest = json.loads((out / "manifest.json").read_text())
    facts = manifest["facts"]
    assert sorted(f["fact_id"] for f in facts) == sorted(f["id"] for f in applied)
    model, tok = load_export(out)
    plain = {f["text"]: greedy(model, tok, f["text"]) for f in facts}  # the checkpoint alone, no memory attached
    assert [answered(plain, f) for f in facts] == [f["answers_without_memory"] for f in facts], plain
    if write == "weights":  # what the ledger says answers, the plain checkpoint answers
        assert all(answered(plain, f) for f in facts), plain
    with load_exported(out, model, tok):  # the export's entity memory (if any) attached: every applied fact
        both = {f["text"]: greedy(model, tok, f["text"]) for f in facts}
    assert all(answered(both, f) for f in facts), both
    del model
    clock.lap("export")
    first = facts[0]["text"]
    assert run("ask", first, "--tokens", "6", "--workspace", ws) == f"{first}{both[first]}\n"  # as transformers
    clock.lap("ask")

    run("rollback", "--to", "0", "--workspace", ws)
    base, edited = run("ask", first, "--tokens", "6", "--base", "--workspace", ws).split("\nedited: ")
    assert base.removeprefix("base:   ") == edited.removesuffix("\n")  # back to the unedited model
    assert run("verify", "--workspace", ws).startswith("OK: ")
    run("export", tmp_path / "rolled-back", "--workspace", ws)
    assert_base_weights(tmp_path / "rolled-back")
    clock.lap("rollback + verify")
    log.warning("%s write: %s; export answers %d/%d applied facts, %d without memory; seconds: %s", write, summary,
                sum(answered(both, f) for f in facts), len(facts), sum(answered(plain, f) for f in facts), clock.laps)
