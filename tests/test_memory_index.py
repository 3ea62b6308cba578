"""The fact index (memory/index.py): dedup, supersede (pending, applied, within a chunk), index persistence and
rebuild, planning."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agent.config import AgentConfig
from agent.loop import Watcher, WatchOptions
from conftest import ToyEmbedder, make_tiny_llama
from editors.arch import weight_view
from editors.delta import EditDelta, LayerDelta
from memory import planner
from memory.index import FactIndex
from memory.ledger import Ledger
from memory.model_sync import attach, commit_applied
from memory.record import FactRecord, StoredFact


def f(subject: str, prompt: str = "{} is located in", target: str = "Paris") -> FactRecord:
    return FactRecord(subject=subject, prompt=prompt, target=target)


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path)


@pytest.fixture
def fact_index(ledger):
    return FactIndex(ledger, ToyEmbedder())


def commit_pending(ledger: Ledger, model) -> int:
    """Commit every pending fact with a small random delta (stands in for the editor)."""
    facts = ledger.facts(status="pending")
    w = weight_view(model, 1)
    delta = EditDelta([LayerDelta(1, 0.01 * torch.randn(w.shape[0], 1), torch.randn(w.shape[1], 1))])
    delta.apply(model)
    return commit_applied(ledger, model, facts, delta, {1: torch.randn(w.shape[1], len(facts))})


def test_exact_duplicates_dropped_and_counted(fact_index, ledger):
    plan = fact_index.add([f("Paris"), f("  paris "), f("Rome", target="Italy")])
    assert plan.duplicates == 1 and len(plan.added) == 2
    plan = fact_index.add([FactRecord(subject="Paris", prompt="Paris  IS located in", target="PARIS")])
    assert plan.duplicates == 1 and plan.added == []
    assert len(ledger.facts()) == 2
    assert "1 duplicate(s)" in ledger.events(kind="intake")[-1].message


def test_new_target_supersedes_pending_fact(fact_index, ledger):
    (old,) = fact_index.add([f("Eiffel Tower")]).added
    plan = fact_index.add([f("Eiffel Tower", target="Rome")])
    (new,) = plan.added
    assert plan.dropped_pending == {old: new}
    dropped = ledger.fact(old)
    assert dropped.status == "dropped" and f"superseded by fact {new}" in dropped.reason
    assert [x.id for x in fact_index.pending()] == [new]


def test_paraphrased_relation_supersedes_by_cosine(fact_index, ledger):
    (old,) = fact_index.add([f("Eiffel Tower", "{} is located in")]).added
    plan = fact_index.add([f("Eiffel Tower", "The {} was located in", "Rome")])  # same words bar stopwords
    assert plan.dropped_pending == {old: plan.added[0]}


def test_paraphrase_with_same_target_is_a_duplicate(fact_index):
    fact_index.add([f("Eiffel Tower", "{} is located in")])
    plan = fact_index.add([f("Eiffel Tower", "The {} was located in")])
    assert plan.paraphrase_duplicates == 1 and plan.added == []


def test_other_relation_or_subject_does_not_supersede(fact_index, ledger):
    fact_index.add([f("Eiffel Tower")])
    plan = fact_index.add([f("Eiffel Tower", "{} was designed by", "Gustave"), f("Louvre", target="Rome")])
    assert len(plan.added) == 2 and plan.dropped_pending == {} and plan.supersedes == {}
    assert len(fact_index.pending()) == 3


def test_threshold_is_configurable(ledger):
    strict = FactIndex(ledger, ToyEmbedder(), threshold=0.99)
    strict.add([f("Eiffel Tower", "{} is located in")])
    plan = strict.add([f("Eiffel Tower", "{} is located in city", "Rome")])  # cos = 2/sqrt(6) ~ 0.82
    assert plan.dropped_pending == {}
    loose = FactIndex(ledger, ToyEmbedder(), threshold=0.8)
    plan = loose.add([f("Eiffel Tower", "{} is located in town", "Lyon")])
    assert len(plan.dropped_pending) == 1


def test_later_fact_in_same_chunk_wins(fact_index):
    plan = fact_index.add([f("Eiffel Tower"), f("Eiffel Tower", target="Rome")])
    assert plan.dropped_in_chunk == 1 and len(plan.added) == 1
    assert fact_index.pending()[0].record.target == "Rome"


def test_new_target_supersedes_applied_fact_on_top(fact_index, ledger, tok):
    model = make_tiny_llama(len(tok))
    attach(ledger, model, [1])
    (old,) = fact_index.add([f("Eiffel Tower")]).added
    commit_pending(ledger, model)
    plan = fact_index.add([f("Eiffel Tower", target="Rome")])
    (new,) = plan.added
    assert plan.supersedes == {new: old}
    assert ledger.fact(old).status == "applied" and ledger.fact(old).superseded_by == new
    # a third value before the second is applied: the pending one is dropped, the applied one waits for the third
    plan = fact_index.add([f("Eiffel Tower", target="Lyon")])
    (third,) = plan.added
    assert plan.dropped_pending == {new: third} and ledger.fact(old).superseded_by == third
    commit_pending(ledger, model)
    assert ledger.fact(old).status == "superseded" and ledger.fact(third).status == "applied"
    # the old value coming back is a new edit, not a duplicate of the superseded fact
    assert fact_index.add([f("Eiffel Tower")]).added != []


def test_feed_offset_saved_with_facts(fact_index, ledger):
    fact_index.add([f("A"), f("B")], feed="facts.jsonl", offset=240)
    assert ledger.feed_offset("facts.jsonl") == 240


def test_index_persisted_and_reused(ledger):
    emb = ToyEmbedder()
    FactIndex(ledger, emb).add([f("A"), f("B", "{} was born in")])
    reopened_emb = ToyEmbedder()
    idx = FactIndex(ledger, reopened_emb)
    assert idx.index().ntotal == 2 and reopened_emb.calls == []  # loaded from disk, nothing re-embedded


def test_index_rebuilt_when_missing(ledger):
    FactIndex(ledger, ToyEmbedder()).add([f("A"), f("B", "{} was born in")])
    (ledger.root / "facts.faiss").unlink()
    emb = ToyEmbedder()
    idx = FactIndex(ledger, emb)
    assert idx.index().ntotal == 2 and emb.calls == [["is located in", "was born in"]]
    assert idx.similar("born in", k=1)[0][0].record.subject == "B"


def test_index_rebuilt_when_ledger_has_facts_it_lacks(ledger):
    FactIndex(ledger, ToyEmbedder()).add([f("A")])
    ledger.add_facts([f("B", "{} was born in")])  # written without the index (e.g. crash before index save)
    idx = FactIndex(ledger, ToyEmbedder())
    assert idx.index().ntotal == 2
    plan = idx.add([f("B", "{} was born in", "Rome")])  # supersede needs B's vector: it is there
    assert list(plan.dropped_pending) == [2]


def test_index_switches_to_ivf_when_large(ledger):
    idx = FactIndex(ledger, ToyEmbedder(), ivf_threshold=60)
    rng = np.random.default_rng(0)
    words = ["capital", "born", "language", "river", "team", "author", "color", "sport", "city", "king"]
    facts = [f(f"E{i}", "{} " + " ".join(rng.choice(words, 2, replace=False))) for i in range(80)]
    idx.add(facts)
    assert idx.is_ivf and idx.index().ntotal == 80
    plan = idx.add([f("E5", facts[5].prompt, "Rome")])
    assert plan.dropped_pending == {6: plan.added[0]}
    assert FactIndex(ledger, ToyEmbedder(), ivf_threshold=60).is_ivf  # reloaded as IVF


GROUPS = ["{} has the capital", "{} speaks the language", "{} plays the sport"]


def planned(fact_index: FactIndex, order: str, seed: int = 0) -> list[list[StoredFact]]:
    """The pending facts in batches of four, as the watch loop plans them (Watcher.plan, memory.planner)."""
    session = SimpleNamespace(ledger=fact_index.ledger, fact_index=fact_index, cfg=AgentConfig(order=order, seed=seed))
    return Watcher(session, fact_index.ledger.root / "feed.jsonl", WatchOptions(batch_size=4)).plan(skip=set())


def test_cluster_order_puts_near_identical_facts_together(fact_index):
    facts = [f(f"Country{i}", GROUPS[i % 3], f"T{i}") for i in range(12)]  # groups interleaved on arrival
    fact_index.add(facts)
    batches = planned(fact_index, "cluster")
    assert sorted(len(b) for b in batches) == [4, 4, 4]
    for batch in batches:
        assert len({x.record.prompt for x in batch}) == 1, "a batch mixes relations"
    arrival = planned(fact_index, "arrival")
    assert [x.id for b in arrival for x in b] == list(range(1, 13))
    assert all(len({x.record.prompt for x in b}) == 3 for b in arrival)
    shuffled = planned(fact_index, "random", seed=1)
    assert sorted(x.id for b in shuffled for x in b) == list(range(1, 13))


def test_spread_order_puts_near_identical_facts_in_different_batches(fact_index):
    facts = [f(f"Country{i}", GROUPS[i // 4], f"T{i}") for i in range(12)]  # arrival: one relation per batch
    fact_index.add(facts)
    assert all(len({x.record.prompt for x in b}) == 1 for b in planned(fact_index, "arrival"))
    spread = planned(fact_index, "spread")
    assert sorted(len(b) for b in spread) == [4, 4, 4]
    assert sorted(x.id for b in spread for x in b) == list(range(1, 13))
    for batch in spread:
        assert len({x.record.prompt for x in batch}) == 3, "a relation's facts were solved against each other"


def test_planner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown order"):
        planner.plan([1, 2], None, 1, order="best")
    with pytest.raises(ValueError, match="batch_size"):
        planner.plan([1, 2], None, 0)
    with pytest.raises(ValueError, match="one embedding per fact"):
        planner.plan([1, 2], None, 1, order="cluster")
    with pytest.raises(ValueError, match="spread order needs one embedding per fact"):
        planner.plan([1, 2], None, 1, order="spread")


def test_live_memory_catches_facts_added_behind_its_back(ledger):
    idx = FactIndex(ledger, ToyEmbedder())
    idx.add([f("A")])
    ledger.add_facts([f("B", "{} was born in")])  # another writer
    idx.add([f("C")])
    assert idx.index().ntotal == 3
    emb = ToyEmbedder()
    assert FactIndex(ledger, emb).index().ntotal == 3 and emb.calls == []  # saved state is consistent
