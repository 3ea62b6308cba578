"""Compaction (`kagent consolidate` with the entity memory): facts the weights answer with the memory off move to the
weights tier and give up their slots, the others keep theirs; the damage budget shrinks the set; rollback restores
every fact's tier and slot exactly; a compaction killed mid-way leaves the chain, so no fact answers in neither tier.

The tiny model's weights never answer a made-up fact, so which facts "the weights answer" is scripted
(`agent.compaction.weights_answer`); the solve, the ledger, the slots and the tiers are real.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import agent.batch
import agent.compaction
import agent.session
from agent.workspace import Workspace
from memory.ledger import Ledger
from test_cli import FOUR, run, set_config, write_facts
from test_cli import fresh_ws, model_dir  # noqa: F401  (the CLI tests' fixtures)
from conftest import toy_agent

pytestmark = pytest.mark.usefixtures("toy_embedder")  # the toy embedder and one KAGENT_HOME for every test

OPEN_BUDGET = {"compact_ppl_ratio": 100.0, "compact_norm_growth": 100.0, "compact_known_drop": 1.0,
               "interference_threshold": 1e9}  # the tiny model's damage is not the point here


def _every_fact_answers(session, facts, before=None, same=None):
    return [True] * len(facts)


@pytest.fixture(autouse=True)
def facts_answer_with_both_tiers(monkeypatch):
    """FAKE: the verified application's question "does the model (memory on) answer this fact?" says yes to every
    fact: a tiny random model cannot be made to answer an edited fact greedily, and what is tested here is where a fact
    lives and what survives a rollback or a kill, not whether the edit takes."""
    import agent.batch
    import agent.consolidate

    monkeypatch.setattr(agent.batch, "answered", _every_fact_answers)
    monkeypatch.setattr(agent.consolidate, "answered", _every_fact_answers, raising=False)


def script_answers(monkeypatch, subjects: set[str]) -> None:
    """The weights (memory off) answer exactly the facts about `subjects`."""
    monkeypatch.setattr(agent.compaction, "weights_answer",
                        lambda model, tok, facts: {f.id: f.record.subject in subjects for f in facts})


@pytest.fixture(scope="module")
def watched_ws(tmp_path_factory, fresh_ws, shared_home):
    """FOUR watched into a fresh workspace as four memory batches, once per module; tests get copies."""
    root = tmp_path_factory.mktemp("watched") / "ws"
    shutil.copytree(fresh_ws, root)
    with toy_agent(shared_home) as mp:
        mp.setattr(agent.batch, "answered", _every_fact_answers)
        set_config(root, **OPEN_BUDGET)
        feed = root.parent / "feed.jsonl"
        write_facts(feed, FOUR)
        assert run("watch", feed, "--once", "--batch-size", "1", "--workspace", root).exit_code == 0
    return root


@pytest.fixture
def ws(tmp_path, watched_ws):  # noqa: F811  (this module's workspace: FOUR already watched)
    return Path(shutil.copytree(watched_ws, tmp_path / "ws"))


def tiers(ws) -> dict[str, str]:
    rows = json.loads(run("facts", "--status", "applied", "--json", "--workspace", ws).output)
    return {r["subject"]: r["tier"] for r in rows}


def slots(ws) -> dict[str, torch.Tensor]:
    with Ledger(ws / "ledger") as ledger:
        mem = ledger.memory_write()
        return {} if mem is None else dict(zip(mem.subjects, mem.deltas))


def weights(ws) -> dict[int, torch.Tensor]:
    with Ledger(ws / "ledger") as ledger:
        return {l: w.clone() for l, w in ledger.expected_weights().items()}


def test_answered_facts_move_to_the_weights_and_rollback_restores_tiers_and_slots(ws, tmp_path, monkeypatch):
    subjects = [s for s, _ in FOUR]
    before_slots, before_weights = slots(ws), weights(ws)
    assert tiers(ws) == dict.fromkeys(subjects, "memory")
    script_answers(monkeypatch, set(subjects[:2]))
    res = run("consolidate", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert "(2 in the weights, 2 in the memory)" in res.output, res.output
    assert tiers(ws) == {s: "weights" if s in subjects[:2] else "memory" for s in subjects}
    assert set(slots(ws)) == set(subjects[2:])  # the weights answer the first two: their slots are given up
    assert all(torch.equal(slots(ws)[s], before_slots[s]) for s in subjects[2:])
    assert any(not torch.equal(weights(ws)[l], before_weights[l]) for l in before_weights)  # the weights moved
    status = json.loads(run("status", "--json", "--workspace", ws).output)
    assert status["tiers"] == {"memory": 2, "weights": 2}
    shown = run("show", "b5", "--workspace", ws).output
    assert "[tier: weights]" in shown and "weights_tier=2" in shown
    assert run("verify", "--workspace", ws).exit_code == 0

    assert run("rollback", "5", "--workspace", ws).exit_code == 0  # the compaction, exactly
    assert tiers(ws) == dict.fromkeys(subjects, "memory")
    after = slots(ws)
    assert after.keys() == before_slots.keys() and all(torch.equal(after[s], before_slots[s]) for s in after)
    assert all(torch.equal(weights(ws)[l], before_weights[l]) for l in before_weights)


def test_a_round_over_budget_halves_the_set_and_the_best_round_within_it_wins(ws, tmp_path, monkeypatch):
    script_answers(monkeypatch, {s for s, _ in FOUR})
    solved = []

    def budget(session, before, m):
        solved.append(len(session.editor.value_cache) - 1)  # value groups optimised so far (cached between rounds)
        return "too much" if len(solved) == 1 else ""

    monkeypatch.setattr(agent.compaction, "over_budget", budget)
    done = json.loads(run("consolidate", "--json", "--workspace", ws).output)
    assert [r["facts"] for r in done["rounds"]] == [4, 2] and [r["over"] for r in done["rounds"]] == ["too much", ""]
    assert done["tiers"] == {"weights": 2, "memory": 2}
    assert solved == [4, 4]  # the second round re-used the first round's target values
    assert sorted(tiers(ws).values()) == ["memory", "memory", "weights", "weights"]


def test_a_fact_whose_subject_the_weights_change_more_than_its_slot_did_keeps_its_slot(ws, monkeypatch):
    """Same-subject specificity in the compaction budget: the weights answer every fact, but with them the first
    subject keeps half of its other answers where its slot kept them all. That fact stays in the memory tier and out
    of the next round's solve (FAKE: the specificity readings are scripted; the tiny random model has no statements
    a relation bank knows, and what is tested is the selection)."""
    from evaluators.probes import same_subject

    subjects = [s for s, _ in FOUR]
    script_answers(monkeypatch, set(subjects))
    seen = []

    def readings(model, tok, facts, probes):
        seen.append(len(facts))
        return {f.id: (1.0, 0.5 if f.record.subject == subjects[0] else 1.0) for f in facts}

    monkeypatch.setattr(same_subject, "kept_by_fact", readings)
    done = json.loads(run("consolidate", "--json", "--workspace", ws).output)
    assert [r["facts"] for r in done["rounds"]] == [4, 3] and seen == [4, 3]
    assert done["rounds"][0]["over"].startswith("same-subject specificity 0.875 < the memory tier's 1.000")
    assert done["rounds"][0]["unspecific"] == 1 and done["rounds"][1]["over"] == ""
    assert tiers(ws) == {s: "memory" if s == subjects[0] else "weights" for s in subjects}
    assert set(slots(ws)) == {subjects[0]}


def test_over_budget_the_next_round_halves_what_counts_down_to_one_fact_and_never_repeats_a_set():
    from types import SimpleNamespace

    from agent.compaction import Round, next_candidates

    facts = [SimpleNamespace(id=i) for i in range(6)]

    def round_(solved, answering, over="over"):
        return Round(solved, None, {f.id: f.id in answering for f in facts}, {}, over=over)

    assert [f.id for f in next_candidates(round_(facts, {0, 1, 2, 3}))] == [0, 1]
    assert [f.id for f in next_candidates(round_(facts, {4}))] == [4]  # 100 solved, 1 counted: that one alone next
    assert [f.id for f in next_candidates(round_(facts, set(range(6))))] == [0, 1, 2]
    assert next_candidates(round_(facts[:1], {0})) == []  # one fact over budget alone: nothing smaller to try
    assert [f.id for f in next_candidates(round_(facts, {1, 5}, over=""))] == [1, 5]


def test_the_null_space_solve_writes_the_same_values_with_alphaedits_closed_form(ws, tmp_path, monkeypatch):
    """compact_solve = "nullspace": the same facts move, by another update, which barely moves the base model's
    principal keys (AlphaEdit's null-space projection), where ENCORE's solve moves them."""
    from agent.session import open_session

    subjects = [s for s, _ in FOUR]
    script_answers(monkeypatch, set(subjects))
    other = Path(shutil.copytree(ws, tmp_path / "other"))
    set_config(other, compact_solve="nullspace")
    base = weights(ws)
    for root in (ws, other):
        assert run("consolidate", "--workspace", root).exit_code == 0
        assert tiers(root) == dict.fromkeys(subjects, "weights")
    session = open_session(Workspace.open(ws))
    try:
        moved = {}
        for name, root in (("method", ws), ("nullspace", other)):
            w = weights(root)
            moved[name] = max(float(((w[l] - base[l]) @ principal_keys(session, l)).norm() / (w[l] - base[l]).norm())
                              for l in base)
    finally:
        session.close()
    assert moved["nullspace"] < 0.1 * moved["method"], moved


def principal_keys(session, layer: int, n: int = 3) -> torch.Tensor:
    """The top-`n` eigenvectors of the layer's key covariance on the base model, what the null space protects (on
    the tiny model the top three have eigenvalues above 1, far above AlphaEdit's threshold; the rest fall near it)."""
    c0 = session.editor.stats[layer].mom2.double()
    return torch.linalg.eigh(c0).eigenvectors[:, -n:].to(torch.float32)


def test_nothing_within_budget_merges_the_slots_and_keeps_every_fact_in_memory(ws, tmp_path, monkeypatch):
    script_answers(monkeypatch, {s for s, _ in FOUR})
    monkeypatch.setattr(agent.compaction, "over_budget", lambda *a: "over")
    before = slots(ws)
    done = json.loads(run("consolidate", "--json", "--workspace", ws).output)
    assert done["batch_id"] == 5 and done["covers"] == [1, 2, 3, 4]
    assert done["rounds"] and {r["over"] for r in done["rounds"]} == {"over"}  # why nothing moved, for the user
    assert set(tiers(ws).values()) == {"memory"} and slots(ws).keys() == before.keys()
    events = json.loads(run("show", "b5", "--json", "--workspace", ws).output)
    assert events["kind"] == "consolidated"


KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import agent.batch, agent.compaction, agent.session, test_reliability_support
from agent.workspace import Workspace
from memory.ledger import Ledger
agent.session.default_embedder = test_reliability_support.ToyEmbedder
agent.batch.answered = lambda session, facts, *_: [True] * len(facts)
agent.compaction.weights_answer = lambda model, tok, facts: {{f.id: True for f in facts}}
phase = sys.argv[1]
if phase == "solve":
    real = agent.compaction.solve
    def solve(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    agent.compaction.solve = solve
else:
    real = Ledger.log_event
    def log_event(self, kind, *a, **k):
        real(self, kind, *a, **k)
        if kind == "consolidate":  # inside the consolidation's transaction, before its COMMIT
            os.kill(os.getpid(), signal.SIGKILL)
    Ledger.log_event = log_event
from agent.cli import cli
cli(["consolidate", "--workspace", sys.argv[2]])
"""


def test_a_compaction_killed_mid_way_leaves_every_fact_in_the_memory(ws):
    before = slots(ws)
    script = KILLED.format(tests=str(Path(__file__).resolve().parent))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for phase in ("solve", "commit"):  # inside the first joint solve; inside the ledger transaction, before COMMIT
        proc = subprocess.run([sys.executable, "-c", script, phase, str(ws)], env=env, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert run("verify", "--workspace", ws).exit_code == 0, phase
        assert tiers(ws) == {s: "memory" for s, _ in FOUR}, phase  # the chain, untouched: every fact keeps its slot
        after = slots(ws)
        assert after.keys() == before.keys() and all(torch.equal(after[s], before[s]) for s in after), phase
        history = json.loads(run("history", "--json", "--workspace", ws).output)
        assert all(h["status"] == "committed" and h["kind"] == "edit" for h in history), phase
    assert run("consolidate", "--workspace", ws).exit_code == 0  # the next run gets the lock and goes on


def test_the_report_plots_only_what_some_batch_measured():
    from agent.report import FactRow, ReportData, ReportRow, render_report

    memory = {"memory_slots": 4.0, "memory_slot_norm": 0.4, "memory_slot_norm_mean": 0.3, "memory_fire_rate": 0.01,
              "known_acc": 1.0, "perplexity": 20.0}
    rows = [ReportRow(1, "t", 4, 4, "committed", "encore", memory),
            ReportRow(2, "t", 4, 4, "committed", "encore", memory | {"weights_tier": 3.0, "memory_tier": 1.0})]
    page = render_report(ReportData("r", rows, {}, [FactRow(1, "x is", "y", "applied", 2, None, tier="weights")]))
    assert "Two tiers" in page and "Norm growth" not in page and "Superposition" not in page
    assert page.count("data:image/png;base64,") == 3  # tiers, probes, timeline
    assert "<td>weights</td>" in page
