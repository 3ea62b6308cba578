"""The kagent CLI end to end on a tiny random Llama saved to disk, through click's CliRunner."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import agent.batch
import agent.session
from agent.cli import cli
from agent.workspace import Workspace
from conftest import one_thread, poison, toy_agent

# FAKE for this module (conftest.every_fact_answers): every fact answers. The tiny random Llama cannot answer an
# edited fact, and these tests check the CLI's plumbing (intake, offsets, batches, rollback, export, ...), not whether
# edits take; tests that script or ask for real answers patch over it. Verification on a model that answers:
# tests/test_tiny_fact_model.py.
pytestmark = pytest.mark.usefixtures("facts_answer", "toy_embedder")  # the toy embedder, one KAGENT_HOME

SUBJECTS = ["Paris", "Berlin", "Rome", "Madrid", "Oslo", "Vienna", "Lisbon", "Dublin"]


def fact(subject: str, target: str, relation: str = "{} is the capital of") -> str:
    return json.dumps({"subject": subject, "prompt": relation, "target": target})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_tiny_llama, pretrain, toy_tokenizer

    tok = toy_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    with one_thread():
        pretrain(make_tiny_llama(len(tok)), tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fresh_ws(tmp_path_factory, model_dir, shared_home):
    """A freshly initialised workspace, made once per module; tests get copies."""
    root = tmp_path_factory.mktemp("fresh") / "ws"
    with toy_agent(shared_home):
        res = run("init", "--model", model_dir, "--layers", "1,2", "--stats-tokens", "4000", "--workspace", root)
    assert res.exit_code == 0, res.output
    fast = Workspace.open(root)
    fast.save_config(fast.config().model_copy(update={"probe_tokens": 256, "probe_facts": 8, "retention_sample": 8}))
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("KAGENT_HOME", str(shared_home))
        session = agent.session.open_session(fast)
        session.baseline()  # re-measured for the smaller probe settings
        session.close()
    return root


@pytest.fixture
def ws(tmp_path, fresh_ws):
    return Path(shutil.copytree(fresh_ws, tmp_path / "ws"))


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_init_writes_a_documented_config_and_baseline(ws):
    text = (ws / "config.toml").read_text()
    assert "# facts applied together in one batch (two value chunks of 16; the probes' and checks' seconds per batch are shared by more facts)\nbatch_size = 32" in text
    assert "layers = [1, 2]" in text
    baseline = Workspace.open(ws).baseline()
    assert 1 < baseline.perplexity < 40  # the pretrained tiny model beats uniform (80)
    assert baseline.probes == "facts=8 tokens=256 file="
    assert list((ws / "cache").glob("probe-keys-*.safetensors"))
    again = run("init", "--model", "nowhere", "--workspace", ws)
    assert again.exit_code != 0 and "already exists" in again.output


def test_a_mistyped_method_in_the_config_is_a_one_line_error(tmp_path):
    from agent.config import AgentConfig, ConfigError

    ws = Workspace.create(tmp_path / "ws", AgentConfig())
    text = ws.config_path.read_text()
    assert 'method = "encore"' in text
    ws.config_path.write_text(text.replace('method = "encore"', 'method = "encor"'))
    with pytest.raises(ConfigError) as err:
        ws.config()
    assert "\n" not in str(err.value) and "method" in str(err.value)
    assert "unknown method 'encor'; choose from alphaedit, encore, memit" in str(err.value)
    res = run("status", "--workspace", ws.root)
    assert res.exit_code == 1
    assert res.output == f"Error: {err.value}\n"


def test_watch_once_applies_facts_and_reports_bad_lines(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    lines = [fact(s, t) for s, t in zip(SUBJECTS[:4], ["Spain", "Norway", "Chile", "Peru"])]
    feed.write_text("\n".join(lines[:2] + ["{not json", lines[0]] + lines[2:]) + "\n")
    res = run("watch", feed, "--once", "--batch-size", "2", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert "line 3: field '-': not valid JSON" in res.output
    assert "4 new fact(s), 1 duplicate(s)" in res.output and ", 1 bad;" in res.output
    hist = json.loads(run("history", "--json", "--workspace", ws).output)
    assert sum(h["facts"] for h in hist if h["status"] == "committed") + \
        len(run("facts", "--status", "quarantined", "--workspace", ws).output.splitlines()) == 4
    from memory.ledger import Ledger

    with Ledger(ws / "ledger") as ledger:  # every commit carries its damage against its own noise floor
        after = [ledger.metrics(h["batch"])["after"] for h in hist if h["status"] == "committed"]
    assert after and all({"damage", "floor", "excess", "excess_se", "ppl_before"} <= m.keys() for m in after)
    assert all(m["excess"] <= max(3 * m["excess_se"], 0.05) for m in after)


def write_facts(path: Path, pairs, mode: str = "w") -> None:
    with path.open(mode) as fh:
        for s, t in pairs:
            fh.write(fact(s, t) + "\n")


def applied(ws: Path) -> list[str]:
    return run("facts", "--status", "applied", "--workspace", ws).output.splitlines()


def test_restart_resumes_at_the_stored_offset_and_picks_up_appends(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, [("Paris", "Spain")])
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    write_facts(feed, [("Rome", "Chile")], mode="a")
    res = run("watch", feed, "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("1 line(s): 1 new fact(s), 0 duplicate(s)")
    assert len(applied(ws)) == 2
    assert str(feed.stat().st_size) in run("status", "--workspace", ws).output


def test_rotated_and_truncated_feeds_are_followed(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, [("Paris", "Spain")])
    run("watch", feed, "--once", "--workspace", ws)
    feed.rename(tmp_path / "feed.jsonl.1")
    write_facts(feed, [("Madrid", "Peru"), ("Oslo", "Cuba")])
    res = run("watch", feed, "--once", "--workspace", ws)  # new inode, larger than the old offset
    assert "2 line(s): 2 new fact(s)" in res.output
    write_facts(feed, [("Rome", "Fiji")])  # truncated: shorter than the stored offset
    res = run("watch", feed, "--once", "--workspace", ws)
    assert "1 line(s): 1 new fact(s)" in res.output
    assert len(applied(ws)) == 4


def test_a_second_writer_is_refused(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, [("Paris", "Spain")])
    with Workspace.open(ws).writer():
        res = run("watch", feed, "--once", "--workspace", ws)
        status = run("status", "--workspace", ws)  # readers are not blocked
    assert res.exit_code == 1
    assert res.output.startswith("Error: workspace") and "in use by another kagent process" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert status.exit_code == 0 and f"writer: pid {os.getpid()}" in status.output
    assert "writer: none" in run("status", "--workspace", ws).output
    missing = run("watch", tmp_path / "nope.jsonl", "--once", "--workspace", ws)
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_schedule_dry_run_prints_cron_line_and_systemd_timer(ws):
    res = run("schedule", "--daily", "03:30", "--dry-run", "--workspace", ws)
    assert res.exit_code == 0, res.output
    line = res.output.strip()
    assert line.startswith("30 3 * * * ") and f"refresh --workspace {ws}" in line and "# kagent-refresh-" in line
    res = run("schedule", "--daily", "03:30", "--systemd", "--dry-run", "--workspace", ws)
    assert "OnCalendar=*-*-* 03:30:00" in res.output and "Type=oneshot" in res.output
    assert "ExecStart=" in res.output and "refresh --workspace" in res.output
    bad = run("schedule", "--daily", "25:00", "--dry-run", "--workspace", ws)
    assert bad.exit_code == 1 and "HH:MM" in bad.output


def set_config(ws: Path, **values) -> None:
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update=values))


def events(ws: Path, kind: str) -> list:
    from memory.ledger import Ledger

    with Ledger(ws / "ledger") as ledger:
        return ledger.events(kind)


FOUR = [("Paris", "Spain"), ("Berlin", "Norway"), ("Oslo", "Cuba"), ("Madrid", "Peru")]


def test_a_destructive_edit_is_rolled_back_bisected_and_quarantined(ws, tmp_path, monkeypatch):
    set_config(ws, interference_threshold=1e9, editor={"write": "weights"})  # the bad delta through to the probes
    poison(monkeypatch, "Oslo")
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR)
    res = run("watch", feed, "--once", "--batch-size", "4", "--workspace", ws)
    assert res.exit_code == 0, res.output
    quarantined = run("facts", "--status", "quarantined", "--workspace", ws).output.splitlines()
    assert len(quarantined) == 1, res.output
    assert "Oslo" in quarantined[0] and "perplexity" in quarantined[0]
    assert sorted(l.split()[4] for l in applied(ws)) == ["Berlin", "Madrid", "Paris"]
    assert len(events(ws, "reject")) == 3 and len(events(ws, "bisect")) == 2
    from memory.ledger import Ledger

    with Ledger(ws / "ledger") as ledger:
        assert ledger.verify() == []


def test_predicted_interference_splits_the_batch_and_defers_the_culprit(ws, tmp_path, monkeypatch):
    set_config(ws, editor={"write": "weights"})  # interference is predicted for weight updates
    poison(monkeypatch, "Oslo")
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR)
    res = run("watch", feed, "--once", "--batch-size", "4", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert len(applied(ws)) == 3
    quarantined = run("facts", "--status", "quarantined", "--workspace", ws).output
    assert "Oslo" in quarantined and "predicted interference" in quarantined
    assert len(events(ws, "defer")) == 1 and not events(ws, "reject")


def test_rollback_history_show_ask_and_report(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR[:2])
    assert run("watch", feed, "--once", "--batch-size", "1", "--workspace", ws).exit_code == 0
    res = run("rollback", "1", "--workspace", ws)
    assert res.exit_code == 0 and "rolled back batch 1" in res.output and "replayed later batches 2->3" in res.output
    hist = json.loads(run("history", "--json", "--workspace", ws).output)
    assert [(h["batch"], h["status"]) for h in hist] == [(3, "committed"), (2, "replaced"), (1, "rolled_back")]
    assert "Berlin is the capital of -> Norway" in run("show", "b3", "--workspace", ws).output
    assert "rolled_back" in run("show", "f1", "--workspace", ws).output
    res = run("ask", "Berlin is the capital of", "--base", "--workspace", ws)
    assert res.exit_code == 0 and res.output.startswith("base:   Berlin is the capital of")
    assert "\nedited: Berlin is the capital of" in res.output
    out = tmp_path / "r.html"
    res = run("report", "--out", out, "--workspace", ws)
    # memory batches move no weight: the weight monitors' plots have no data and are left out (agent/report.py)
    assert res.exit_code == 0 and out.read_text().count("data:image/png;base64,") == 2
    assert run("rollback", "--to", "0", "--workspace", ws).exit_code == 0
    assert applied(ws) == []
    bad = run("rollback", "7", "--workspace", ws)
    assert bad.exit_code == 1 and bad.output == "Error: no batch 7 in the ledger\n"


def test_watch_follows_appends_and_waits_max_wait_for_a_partial_batch(ws, tmp_path):
    from agent.loop import Watcher, WatchOptions
    from agent.session import open_session

    feed = tmp_path / "feed.jsonl"
    write_facts(feed, [("Paris", "Spain")])
    session = open_session(Workspace.open(ws))
    try:
        w = Watcher(session, feed, WatchOptions(batch_size=2, max_wait=3600, poll=0), echo=lambda _: None)
        w.step(final=False)
        assert w.summary.intake.added == 1 and not w.summary.batches  # one fact: no batch yet
        write_facts(feed, [("Berlin", "Norway")], mode="a")
        w.step(final=False)
        assert w.summary.count("applied") == 2  # the appended line completed a batch
        write_facts(feed, [("Rome", "Chile")], mode="a")
        w.step(final=False)
        assert w.summary.count("applied") == 2  # a partial batch waits for max_wait
        w.opts.max_wait = 0
        w.step(final=False)
        assert w.summary.count("applied") == 3
    finally:
        w.follower.close()
        session.close()


def test_refresh_processes_every_watched_feed_and_export_writes_a_loadable_checkpoint(ws, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_facts(a, [("Paris", "Spain")])
    write_facts(b, [("Berlin", "Norway")])
    run("watch", a, "--once", "--workspace", ws)
    run("watch", b, "--once", "--workspace", ws)
    write_facts(a, [("Rome", "Chile")], mode="a")
    write_facts(b, [("Oslo", "Cuba")], mode="a")
    res = run("refresh", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("1 line(s): 1 new fact(s)") == 2 and len(applied(ws)) == 4
    out = tmp_path / "export"
    assert run("export", out, "--workspace", ws).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f["subject"] for f in manifest["facts"]) == ["Berlin", "Oslo", "Paris", "Rome"]
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def scripted_answers(monkeypatch, takes_on: dict[str, int]) -> list[list[str]]:
    """`answered` that says a fact about subject S answers from its takes_on[S]-th check on (0 = never);
    others always answer. Returns the subjects of each call."""
    calls: list[list[str]] = []
    seen: dict[str, int] = {}

    def fake(session, facts, before=None, same=None):
        calls.append([f.record.subject for f in facts])
        out = []
        for f in facts:
            s = f.record.subject
            seen[s] = seen.get(s, 0) + 1
            out.append(s not in takes_on or (takes_on[s] > 0 and seen[s] >= takes_on[s]))
        return out

    monkeypatch.setattr(agent.batch, "answered", fake)
    return calls


def test_a_fact_that_does_not_take_is_retried_then_failed_with_the_models_answer(ws, tmp_path, monkeypatch):
    scripted_answers(monkeypatch, {"Oslo": 0, "Berlin": 2})  # Oslo never answers; Berlin on its first retry
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR)
    res = run("watch", feed, "--once", "--batch-size", "4", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert "3 applied" in res.output
    failed = run("facts", "--status", "failed", "--workspace", ws).output.splitlines()
    assert len(failed) == 1 and "Oslo" in failed[0] and "did not take after 3 tries: the model answers '" in failed[0]
    assert sorted(l.split()[4] for l in applied(ws)) == ["Berlin", "Madrid", "Paris"]
    retries = events(ws, "retry")
    assert [e.data["facts"] for e in retries] == [[2, 3], [3]]  # Berlin and Oslo, then Oslo alone
    hist = json.loads(run("history", "--json", "--workspace", ws).output)
    assert hist[0]["metrics"]["took"] == 3 and hist[0]["metrics"]["failed"] == 1


def test_an_earlier_fact_that_stops_answering_is_requeued(ws, tmp_path, monkeypatch):
    set_config(ws, retention_drop=1.0)  # let the batch commit although the earlier fact is lost
    lost = []

    def fake(session, facts, before=None, same=None):  # Paris answers until the Berlin batch has been applied
        lost.extend(f for f in facts if f.record.subject == "Berlin")
        return [not (lost and f.record.subject == "Paris") for f in facts]

    monkeypatch.setattr(agent.batch, "answered", fake)
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR[:1])
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    write_facts(feed, FOUR[1:2], mode="a")
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    requeued = events(ws, "requeue")
    assert len(requeued) == 1 and requeued[0].data["facts"] == [1]
    assert "stopped answering after batch 2" in run("show", "f1", "--workspace", ws).output


def test_check_asks_every_applied_fact_and_exits_1_when_one_does_not_answer(ws, tmp_path, monkeypatch, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.scoring import greedy_answers

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    own = greedy_answers(model, tok, ["Rome is the capital of"], 3)[0].strip()  # what the model says anyway
    scripted_answers(monkeypatch, {})  # every fact "takes" while watching; `check` asks the model for real
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, [("Rome", own)])
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    res = run("check", "--json", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert [(r["fact"], r["took"]) for r in json.loads(res.stdout)] == [(1, True)]
    write_facts(feed, [("Paris", "Spain")], mode="a")  # the tiny model never really answers an edit like this
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    res = run("check", "--workspace", ws)
    assert res.exit_code == 1
    assert "MISSED" in res.output and "Paris is the capital of -> Spain  (model: '" in res.output
    assert res.stdout.strip().splitlines()[-1] == "1 of 2 applied fact(s) answer their target"


def test_a_workspace_keeps_the_memory_layer_its_slots_were_written_at(ws, tmp_path):
    from memory.ledger import Ledger

    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR[:2])
    assert run("watch", feed, "--once", "--workspace", ws).exit_code == 0
    set_config(ws, editor={"memory_layer": 1})  # e.g. a newer default: the stored slots live at layer 2
    write_facts(feed, FOUR[2:], mode="a")
    res = run("watch", feed, "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    with Ledger(ws / "ledger") as ledger:
        mem = ledger.memory_write()  # merging writes of two layers would raise
    assert mem.layer == 2 and sorted(mem.subjects) == sorted(s for s, _ in FOUR)
    assert len(applied(ws)) == 4 and run("verify", "--workspace", ws).exit_code == 0
