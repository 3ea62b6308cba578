"""`kagent consolidate`: one batch re-solved from the base weights replaces the chain; rolling it back (or back past
it) restores the chain bit for bit; the guard keeps the chain when the consolidated model probes worse."""
from __future__ import annotations

import json

import pytest
import torch

import agent.consolidate
from memory.ledger import Ledger
from test_cli import FOUR, applied, events, run, set_config, write_facts
from test_cli import fresh_ws, model_dir, ws  # noqa: F401  (the CLI tests' fixtures)

# FAKE for this module (conftest.every_fact_answers): every fact answers, on the tiny random Llama of the CLI tests that
# cannot answer any; what is tested is how the chain is replaced and restored. A consolidation on a model that answers:
# tests/test_tiny_fact_model.py.
pytestmark = pytest.mark.usefixtures("facts_answer", "toy_embedder")


def state(ws):
    """The ledger's view of the model: tracked weights and entity-memory slots."""
    with Ledger(ws / "ledger") as ledger:
        mem = ledger.memory_write()
        return ({l: w.clone() for l, w in ledger.expected_weights().items()},
                {} if mem is None else dict(zip(mem.subjects, mem.deltas)))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def statuses(ws):
    rows = json.loads(run("history", "--json", "--workspace", ws).output)
    return [(h["batch"], h["status"], h["kind"]) for h in rows]


def watch(ws, tmp_path, pairs, batch_size="1"):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, pairs)
    assert run("watch", feed, "--once", "--batch-size", batch_size, "--workspace", ws).exit_code == 0


def test_memory_consolidation_replaces_the_chain_and_rolls_back_exactly(ws, tmp_path):
    watch(ws, tmp_path, FOUR)
    weights, slots = state(ws)
    res = run("consolidate", "--workspace", ws)
    assert res.exit_code == 0 and res.output.startswith("consolidated batches [1, 2, 3, 4] into batch 5"), res.output
    assert statuses(ws)[:2] == [(5, "committed", "consolidated"), (4, "consolidated", "edit")]
    w5, s5 = state(ws)
    assert same(w5, weights) and same(s5, slots)  # slots were optimised on the base model: kept as they are
    assert run("verify", "--workspace", ws).exit_code == 0 and len(applied(ws)) == 4
    assert run("consolidate", "--workspace", ws).output.startswith("nothing to consolidate: batch 5 is already one")
    assert run("rollback", "--to", "2", "--workspace", ws).exit_code == 0
    assert statuses(ws) == [(5, "rolled_back", "consolidated"), (4, "rolled_back", "edit"),
                            (3, "rolled_back", "edit"), (2, "committed", "edit"), (1, "committed", "edit")]
    _, s2 = state(ws)
    assert set(s2) == {"Paris", "Berlin"} and all(torch.equal(s2[k], slots[k]) for k in s2)
    assert len(applied(ws)) == 2 and run("verify", "--workspace", ws).exit_code == 0


def test_weight_consolidation_is_relative_to_the_base_and_its_rollback_restores_the_chain(ws, tmp_path, monkeypatch):
    set_config(ws, interference_threshold=1e9, editor={"write": "weights"})
    monkeypatch.setattr(agent.consolidate, "PPL_TOLERANCE", 1e9)  # the tiny model's perplexity is not the point here
    watch(ws, tmp_path, FOUR, "2")
    chain, _ = state(ws)
    res = run("consolidate", "--json", "--workspace", ws)
    assert res.exit_code == 0, res.output
    done = json.loads(res.output)
    assert done["batch_id"] == 3 and done["covers"] == [1, 2] and done["facts"] == 4
    solved, _ = state(ws)
    assert not same(solved, chain)  # one joint solve from the base weights, not the sum of the chain
    assert run("verify", "--workspace", ws).exit_code == 0
    assert run("rollback", "3", "--workspace", ws).exit_code == 0
    back, _ = state(ws)
    assert same(back, chain) and statuses(ws)[1:] == [(2, "committed", "edit"), (1, "committed", "edit")]
    assert len(applied(ws)) == 4 and run("verify", "--workspace", ws).exit_code == 0


def test_rolling_back_a_covered_batch_unconsolidates_then_replays(ws, tmp_path, monkeypatch):
    watch(ws, tmp_path, FOUR[:3])
    assert run("consolidate", "--workspace", ws).exit_code == 0
    res = run("rollback", "2", "--workspace", ws)
    assert res.exit_code == 0 and "rolled back consolidation 4" in res.output, res.output
    assert sorted(l.split()[4] for l in applied(ws)) == ["Oslo", "Paris"]  # Berlin (batch 2) is out, Oslo replayed
    assert run("verify", "--workspace", ws).exit_code == 0


def test_the_guard_keeps_the_chain_when_the_consolidation_probes_worse(ws, tmp_path, monkeypatch):
    set_config(ws, interference_threshold=1e9, editor={"write": "weights"})
    monkeypatch.setattr(agent.consolidate, "PPL_TOLERANCE", -1.0)  # any perplexity counts as worse
    watch(ws, tmp_path, FOUR, "2")
    chain, _ = state(ws)
    res = run("consolidate", "--workspace", ws)
    assert res.exit_code == 0 and res.output.startswith("kept the chain of batches [1, 2]"), res.output
    after, _ = state(ws)
    assert same(after, chain) and [s for _, s, _ in statuses(ws)] == ["committed", "committed"]
    assert "probes worse (perplexity" in events(ws, "consolidate")[-1].message


@pytest.mark.parametrize("enabled", [True, False])
def test_refresh_consolidates_after_its_feeds_unless_configured_off(ws, tmp_path, enabled):
    feed = tmp_path / "feed.jsonl"
    write_facts(feed, FOUR[:2])
    set_config(ws, feeds=[str(feed)], consolidate_on_refresh=enabled, batch_size=1)
    res = run("refresh", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert ("consolidated batches [1, 2] into batch 3" in res.output) == enabled


def test_the_weight_write_with_every_mover_on_runs_through_the_agent(ws, tmp_path, monkeypatch):
    """values_on=base needs the session to hand the editor its base weights; spread order needs the fact vectors."""
    set_config(ws, interference_threshold=1e9, order="spread",
               editor={"write": "weights", "values_on": "base", "nas_factor": 2.0, "protect_energy": 0.5})
    monkeypatch.setattr(agent.consolidate, "PPL_TOLERANCE", 1e9)
    watch(ws, tmp_path, FOUR, "2")
    assert [k for _, _, k in statuses(ws)] == ["edit", "edit"]
    res = run("consolidate", "--json", "--workspace", ws)
    assert res.exit_code == 0 and json.loads(res.output)["covers"] == [1, 2], res.output
    assert run("verify", "--workspace", ws).exit_code == 0
