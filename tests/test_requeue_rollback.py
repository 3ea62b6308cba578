"""Two bookkeeping bugs found by reading (issue 29), each pinned by a test that failed before its fix:

- `agent/admission.py` `merge` dropped the `failed` facts of each group, so the watch line never counted them;
- a fact re-queued from batch 1 and applied again by batch 2 is listed by both; rolling back batch 1 marked it
  `rolled_back` (and so left it out of batch 2's replay) although batch 2 still held it.
"""
from __future__ import annotations

import torch

from conftest import make_tiny_llama, rand_delta
from agent.admission import AdmittedOutcome, merge
from agent.batch import BatchOutcome
from agent.loop import WatchSummary, batch_line
from editors.arch import weight_view
from memory.ledger import Ledger
from memory.model_sync import attach, commit_applied, rollback
from memory.record import FactRecord

LAYERS = [1, 2]


def test_merge_keeps_the_failed_facts_and_the_watch_lines_count_them():
    out = AdmittedOutcome()
    merge(out, BatchOutcome(committed=[1], applied=[1, 2], failed=[3], metrics={"efficacy": 2 / 3}))
    merge(out, BatchOutcome(committed=[2], applied=[4], failed=[5, 6]))
    assert out.failed == [3, 5, 6] and out.applied == [1, 2, 4]
    assert ", 3 failed" in batch_line(out)
    assert "3 applied in 2 batch(es), 3 failed" in WatchSummary(batches=[out]).line()


def recompute(model):
    """A deterministic stand-in editor for the ledger's replay: the delta depends only on the facts' ids."""
    def solve(facts):
        seed = sum(f.id for f in facts)
        g = torch.Generator().manual_seed(seed)
        keys = {l: torch.randn(weight_view(model, l).shape[1], len(facts), generator=g) for l in LAYERS}
        return rand_delta(model, LAYERS, seed), keys
    return solve


def commit(ledger: Ledger, model, ids: list[int]) -> int:
    facts = ledger.facts(ids=ids)
    delta, keys = recompute(model)(facts)
    delta.apply(model)
    return commit_applied(ledger, model, facts, delta, keys)


def test_rolling_back_the_older_batch_leaves_a_requeued_fact_with_the_batch_that_holds_it(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    ledger = Ledger(tmp_path)
    attach(ledger, model, LAYERS)
    a, b, c = ledger.add_facts([FactRecord(subject=f"Entity{i}", prompt="{} is located in", target="Paris")
                                for i in range(3)])
    b1 = commit(ledger, model, [a, b])
    ledger.set_status([a], "pending", f"stopped answering after batch {b1 + 1}; re-queued")  # as agent.batch.requeue
    b2 = commit(ledger, model, [a, c])
    assert {f.id for f in ledger.batch_facts(b1)} == {a, b} and ledger.fact(a).batch_id == b2

    report = rollback(ledger, b1, model, recompute=recompute(model), reason="wrong source")

    assert report.fact_ids == [b]
    ((old, new),) = report.replayed
    assert old == b2
    assert ledger.fact(b).status == "rolled_back"
    assert {(ledger.fact(i).status, ledger.fact(i).batch_id) for i in (a, c)} == {("applied", new)}
    assert ledger.verify() == []
