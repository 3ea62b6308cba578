"""The read-and-repair commands on a ledger built directly (no editor): `verify`, `gc`, the `--json` listings of
`facts`, `show` and `status`, and one-line errors for a bad config.toml in every command that reads it."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from agent.cli import cli
from agent.config import AgentConfig
from agent.workspace import Workspace
from conftest import make_tiny_llama, rand_delta, toy_tokenizer
from editors.arch import weight_view
from memory.ledger import Ledger
from memory.model_sync import attach, commit_applied
from memory.record import FactRecord

LAYERS = [1, 2]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def record(subject: str, target: str, source_id: str) -> FactRecord:
    return FactRecord(subject=subject, prompt="{} is the capital of", target=target, id=source_id, source="test")


@pytest.fixture
def ws(tmp_path) -> Path:
    """A workspace whose ledger holds batch 1 (facts 1, 2 applied), fact 3 quarantined and fact 4 pending."""
    root = Workspace.create(tmp_path / "ws", AgentConfig(model="tiny")).root
    model = make_tiny_llama(len(toy_tokenizer()))
    with Ledger(root / "ledger") as ledger:
        attach(ledger, model, LAYERS)
        ids = ledger.add_facts([record("Paris", "Spain", "src-1"), record("Rome", "Chile", "src-2"),
                                record("Oslo", "Cuba", "src-3"), record("Lima", "Peru", "src-4")])
        delta = rand_delta(model, LAYERS, seed=1)
        delta.apply(model)
        keys = {layer: torch.randn(weight_view(model, layer).shape[1], 2) for layer in LAYERS}
        commit_applied(ledger, model, ledger.facts(ids=ids[:2]), delta, keys, {"after": {"efficacy": 1.0}})
        ledger.quarantine([ids[2]], "probe: perplexity 99 > 1.05 x baseline 20")
    return root


def lines(res) -> list[str]:
    return res.output.strip().splitlines()


def test_verify_says_ok_in_one_line_on_a_healthy_ledger(ws):
    res = run("verify", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert lines(res) == ["OK: 1 batch(es) (1 committed), 4 fact(s), 2 tracked layer(s) verified"]
    assert json.loads(run("verify", "--json", "--workspace", ws).output)["ok"] is True


def test_verify_prints_one_line_per_problem_and_exits_1(ws):
    with Ledger(ws / "ledger") as ledger:
        delta_file = ledger.blobs.path("deltas", ledger.batch(1).delta_hash)
        keys_file = ledger.blobs.path("keys", ledger.batch(1).keys_hash)
    tensors = {"layer.1.u": torch.zeros(4, 1), "layer.1.v": torch.zeros(4, 1)}
    save_file(tensors, str(delta_file))  # a valid safetensors file with other content
    keys_file.unlink()
    db = sqlite3.connect(ws / "ledger" / "ledger.db")
    db.execute("UPDATE facts SET status = 'applied', batch_id = 7 WHERE id = 4")  # no batch 7
    db.commit()
    db.close()
    res = run("verify", "--workspace", ws)
    assert res.exit_code == 1
    problems = lines(res)
    assert len(problems) == 4, res.output
    assert any("deltas file" in p and "tampered or corrupted" in p for p in problems)
    assert any("keys file" in p and "missing" in p for p in problems)
    assert "fact 4 is applied but its batch 7 is None" in problems
    assert "fact 4 names batch 7, which does not list it" in problems
    data = json.loads(run("verify", "--json", "--workspace", ws).output)
    assert data["ok"] is False and data["problems"] == problems


def test_a_damaged_delta_file_error_names_the_verify_command(ws):
    with Ledger(ws / "ledger") as ledger:
        ledger.blobs.path("deltas", ledger.batch(1).delta_hash).write_bytes(b"not safetensors")
    with Ledger(ws / "ledger") as ledger, pytest.raises(Exception) as err:
        ledger.load_delta(1)
    assert "run `kagent verify`" in str(err.value)


def test_gc_lists_then_removes_orphan_files_and_keeps_referenced_ones(ws):
    with Ledger(ws / "ledger") as ledger:
        kept = [p for kind in ("deltas", "keys", "base") for p in (ws / "ledger" / kind).iterdir()]
        orphan = ledger.blobs.write("deltas", "0" * 64, {"x": torch.ones(3)})
    temp = ws / "ledger" / "keys" / f".{'1' * 64}.123.tmp"
    temp.write_bytes(b"half a file")
    dry = run("gc", "--dry-run", "--workspace", ws)
    assert dry.exit_code == 0, dry.output
    assert lines(dry)[-1].startswith("would remove 2 orphan file(s), ")
    assert f"would remove ledger/deltas/{orphan.name} (" in dry.output and "ledger/keys/.111" in dry.output
    assert orphan.exists() and temp.exists()
    res = run("gc", "--workspace", ws)
    assert res.exit_code == 0 and lines(res)[-1].startswith("removed 2 orphan file(s), ")
    assert f"removed ledger/deltas/{orphan.name} (" in res.output
    assert not orphan.exists() and not temp.exists() and all(p.exists() for p in kept)
    assert json.loads(run("gc", "--json", "--workspace", ws).output) == {"dry_run": False, "files": []}
    assert run("verify", "--workspace", ws).exit_code == 0


def test_gc_waits_for_no_writer(ws):
    with Workspace.open(ws).writer():
        res = run("gc", "--workspace", ws)
    assert res.exit_code == 1 and "in use by another kagent process" in res.output


def test_facts_json_has_id_source_id_status_batch_and_reason(ws):
    res = run("facts", "--json", "--workspace", ws)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["id"], r["source_id"], r["status"], r["batch"]) for r in rows] == [
        (1, "src-1", "applied", 1), (2, "src-2", "applied", 1), (3, "src-3", "quarantined", None),
        (4, "src-4", "pending", None)]
    assert rows[2]["reason"] == "probe: perplexity 99 > 1.05 x baseline 20" and rows[0]["reason"] is None
    assert rows[0]["text"] == "Paris is the capital of" and rows[0]["target"] == "Spain"
    only = json.loads(run("facts", "--json", "--status", "quarantined", "--workspace", ws).output)
    assert [r["id"] for r in only] == [3]
    assert json.loads(run("facts", "--json", "--subject", "nowhere", "--workspace", ws).output) == []


def test_show_json_for_a_batch_and_a_fact(ws):
    batch = json.loads(run("show", "b1", "--json", "--workspace", ws).output)
    assert batch["batch"] == 1 and batch["status"] == "committed" and batch["facts"] == 2
    assert [f["id"] for f in batch["fact_list"]] == [1, 2] and batch["metrics_by_phase"] == {"after": {"efficacy": 1.0}}
    assert [e["kind"] for e in batch["events"]] == ["commit"]
    fact = json.loads(run("show", "f3", "--json", "--workspace", ws).output)
    assert fact["status"] == "quarantined" and fact["record"]["id"] == "src-3"
    assert [e["kind"] for e in fact["events"]] == ["quarantine"]
    assert run("show", "f9", "--json", "--workspace", ws).output == "Error: no fact 9 in the ledger\n"


def test_status_json_matches_the_text(ws):
    info = json.loads(run("status", "--json", "--workspace", ws).output)
    assert info["facts"] == {"applied": 2, "pending": 1, "quarantined": 1}
    assert info["last_batch"]["batch"] == 1 and info["writer"] is None and info["model"] == "tiny"
    text = run("status", "--workspace", ws).output
    assert "facts: 2 applied, 1 pending, 1 quarantined" in text and "writer: none (idle)" in text


BAD_CONFIGS = {
    "bad TOML": ("batch_size = = 3\n", "invalid TOML"),
    "unknown key": ('colour = "red"\n', "colour: unknown setting (allowed: model, device,"),
    "bad value": ("batch_size = 0\n", "batch_size = 0: Input should be greater than or equal to 1"),
    "unknown method": ('method = "encor"\n', "unknown method 'encor'"),
    "bad device": ('device = "banana"\n', "device = 'banana': Value error, not a torch device"),
    "not UTF-8": (b"model = '\xff'\n", "cannot read"),
}
# every command that reads config.toml, with arguments that get it that far
CONFIG_COMMANDS = {
    "watch": ["watch", "{feed}", "--once"], "refresh": ["refresh"], "ask": ["ask", "Paris is"],
    "rollback": ["rollback", "--to", "0"], "status": ["status"], "export": ["export", "{out}"],
    "report": ["report", "--out", "{out}.html"],
}


@pytest.mark.parametrize("bad", list(BAD_CONFIGS))
def test_every_config_error_is_one_line_for_every_command_that_reads_it(ws, tmp_path, bad):
    text, expected = BAD_CONFIGS[bad]
    config = ws / "config.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    feed = tmp_path / "feed.jsonl"
    feed.write_text("")
    for name, args in CONFIG_COMMANDS.items():
        argv = [a.format(feed=feed, out=tmp_path / "out") for a in args]
        res = run(*argv, "--workspace", ws)
        assert res.exit_code == 1, (name, res.output)
        assert res.output.startswith(f"Error: {config}: ") and res.output.count("\n") == 1, (name, res.output)
        assert expected in res.output, (name, res.output)


def test_init_refuses_bad_options_in_one_line(tmp_path):
    res = run("init", "--layers", "3,x", "--workspace", tmp_path / "ws")
    assert res.exit_code == 2 and "'3,x': give layer numbers separated by commas" in res.output
    res = run("init", "--device", "banana", "--workspace", tmp_path / "ws")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "not a torch device" in res.output
    assert not (tmp_path / "ws").exists()


def test_layers_the_model_lacks_are_a_one_line_config_error(ws, tmp_path):
    tok = toy_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update={"model": str(tmp_path / "tiny"), "layers": [1, 9]}))
    res = run("rollback", "--to", "0", "--workspace", ws)
    assert res.exit_code == 1
    assert res.output == f"Error: {ws / 'config.toml'}: layers = [1, 9]: the model has 4 layers (0-3)\n"
