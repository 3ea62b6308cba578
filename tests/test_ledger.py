"""Ledger: migrations, atomic commits, exact rollback (latest, middle with replay, --to), verify, export."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from transformers import AutoModelForCausalLM

from agent.admission import RAM_PHASE
from conftest import make_tiny_gpt2, make_tiny_llama, rand_delta
from editors.arch import weight_view
from editors.models import fingerprint
from editors.state import EditorState
from memory.export import export
from memory.ledger import MIGRATIONS, FeedMark, Ledger, LedgerError, LedgerMismatch
from memory.model_sync import attach, commit_applied, rollback, rollback_to
from memory.record import FactRecord

LAYERS = [1, 2]


def rand_keys(model, layers, n: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 10_000)
    return {layer: torch.randn(weight_view(model, layer).shape[1], n, generator=g) for layer in layers}


def fact(i: int, target: str = "Paris") -> FactRecord:
    return FactRecord(subject=f"Entity{i}", prompt="{} is located in", target=target)


def layers_of(model) -> dict[int, torch.Tensor]:
    return {layer: weight_view(model, layer).clone() for layer in LAYERS}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_layers_equal(model, expected: dict[int, torch.Tensor], tol: float = 1e-6) -> None:
    for layer, w in expected.items():
        assert rel_err(weight_view(model, layer), w) <= tol, f"layer {layer} not restored"


class Session:
    """A ledger attached to a tiny model, with an editor state, committing random batches."""

    def __init__(self, root, model):
        self.ledger = Ledger(root)
        self.model = model
        self.state = EditorState(layers=LAYERS)
        attach(self.ledger, model, LAYERS)

    def commit(self, n_facts: int, seed: int) -> int:
        ids = self.ledger.add_facts([fact(seed * 100 + j) for j in range(n_facts)])
        facts = self.ledger.facts(ids=ids)
        delta, keys = recompute_for(self.model)(facts)
        delta.apply(self.model)
        self.state.add_keys(keys)
        return commit_applied(self.ledger, self.model, facts, delta, keys, {"after": {"efficacy": 1.0}}, "encore")


def recompute_for(model):
    """Deterministic fake editor: the delta depends only on the facts' ids."""
    def recompute(facts):
        seed = sum(f.id for f in facts)
        return rand_delta(model, LAYERS, seed), rand_keys(model, LAYERS, len(facts), seed)
    return recompute


def kkt(state: EditorState) -> dict[int, torch.Tensor]:
    return {layer: t.clone() for layer, t in state.kkt.items()}


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tok):
    return make_tiny_llama(len(tok)) if request.param == "llama" else make_tiny_gpt2(len(tok))


def test_migrations_from_empty_db(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.applied_migrations() == [name for name, _ in MIGRATIONS]
    tables = {r[0] for r in ledger.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"facts", "batches", "edits", "metrics", "probes", "events", "feed_offsets", "_migrations"} <= tables
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.close()
    assert Ledger(tmp_path).migrate() == []  # reopening applies nothing twice


def test_migration_from_first_schema_keeps_data(tmp_path):
    old = Ledger(tmp_path, migrations=MIGRATIONS[:1])
    ids = old.add_facts([fact(1), fact(2)])
    with pytest.raises(sqlite3.OperationalError):
        old.add_metrics(1, "after", {"x": 1.0})  # no metrics table in the first schema
    old.close()
    ledger = Ledger(tmp_path)
    assert ledger.applied_migrations() == [name for name, _ in MIGRATIONS]
    assert [f.id for f in ledger.facts(status="pending")] == ids
    ledger.add_facts([fact(3)], feed="feed.jsonl", offset=123)
    assert ledger.feed_offset("feed.jsonl") == 123


def test_ram_metrics_stored_as_phase_memory_read_back_as_ram(tmp_path):
    """m008: a ledger written before it stored a batch's peak RAM under the phase `memory`; on open those rows
    move to `ram` (what agent/admission.py writes now) with their values, and the other phases stay as they are."""
    before = [name for name, _ in MIGRATIONS].index("m008_ram_metrics_phase")
    old = Ledger(tmp_path, migrations=MIGRATIONS[:before])
    old.add_metrics(1, "memory", {"estimate_mb": 512.0, "peak_rss_mb": 480.5})
    old.add_metrics(1, "after", {"known_acc": 0.9})
    old.add_metrics(2, "memory", {"estimate_mb": 256.0, "peak_gpu_mb": 300.0})
    old.close()
    ledger = Ledger(tmp_path)
    assert ledger.applied_migrations()[-1] == "m008_ram_metrics_phase"
    assert ledger.metrics(1) == {"ram": {"estimate_mb": 512.0, "peak_rss_mb": 480.5}, "after": {"known_acc": 0.9}}
    assert ledger.metrics(2) == {"ram": {"estimate_mb": 256.0, "peak_gpu_mb": 300.0}}
    assert RAM_PHASE == "ram"
    ledger.close()


def test_facts_and_feed_offset_commit_together(tmp_path):
    ledger = Ledger(tmp_path)
    with pytest.raises(RuntimeError):
        with ledger.transaction():
            ledger.add_facts([fact(1)], feed="f", offset=50)
            raise RuntimeError("crash before commit")
    assert ledger.facts() == [] and ledger.feed_offset("f") == 0
    ledger.add_facts([fact(1)], feed="f", offset=50)
    assert len(ledger.facts()) == 1 and ledger.feed_offset("f") == 50


def test_feed_position_takes_line_and_inode_only_from_an_event_at_the_stored_offset(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.feed_position("f") == FeedMark(0)
    ledger.add_facts([fact(1)], feed="f", offset=50)
    ledger.log_event("feed", "read f", data={"feed": "f", "offset": 50, "lineno": 3, "inode": 77})
    ledger.log_event("feed", "read g", data={"feed": "g", "offset": 9, "lineno": 1, "inode": 5})
    assert ledger.feed_position("f") == FeedMark(50, 3, 77)
    ledger.set_feed_offset("f", 80)  # the offset moved on without a matching event
    assert ledger.feed_position("f") == FeedMark(80)


def test_rollback_latest_restores_weights_and_state_exactly(tmp_path, model):
    s = Session(tmp_path, model)
    base = layers_of(model)
    b1 = s.commit(3, seed=1)
    after1, state1 = layers_of(model), kkt(s.state)
    b2 = s.commit(2, seed=2)
    assert rel_err(weight_view(model, 1), after1[1]) > 1e-3  # batch 2 really changed the layer
    report = rollback(s.ledger, b2, model, s.state, reason="bad edit")
    assert report.replayed == []
    assert_layers_equal(model, after1)
    for layer in LAYERS:
        torch.testing.assert_close(s.state.kkt[layer], state1[layer], rtol=1e-9, atol=1e-9)
    rolled = s.ledger.batch_facts(b2)
    assert {f.status for f in rolled} == {"rolled_back"} and all("bad edit" in f.reason for f in rolled)
    assert [b.status for b in s.ledger.history()] == ["committed", "rolled_back"]
    rollback(s.ledger, b1, model, s.state)
    assert_layers_equal(model, base, tol=0.0)  # rebuilt from the stored base copy: bit-exact


def test_rollback_middle_batch_replays_later_ones(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    b1, b2, b3 = s.commit(2, seed=1), s.commit(2, seed=2), s.commit(2, seed=3)
    with pytest.raises(LedgerError, match="not the latest"):
        rollback(s.ledger, b2, model, s.state)
    facts3 = s.ledger.batch_facts(b3)
    report = rollback(s.ledger, b2, model, s.state, recompute=recompute_for(model), reason="wrong source")
    ((old, new),) = report.replayed
    assert old == b3 and "replayed" in report.message
    # reference: a fresh base model with batch 1 and the recomputed batch 3 applied, nothing else
    ref = make_tiny_llama(len(tok))
    s.ledger.load_delta(b1).apply(ref)
    s.ledger.load_delta(new).apply(ref)
    assert_layers_equal(model, layers_of(ref))
    ref_state = EditorState(layers=LAYERS)
    ref_state.add_keys(s.ledger.load_keys(b1))
    ref_state.add_keys(s.ledger.load_keys(new))
    for layer in LAYERS:
        torch.testing.assert_close(s.state.kkt[layer], ref_state.kkt[layer], rtol=1e-9, atol=1e-9)
    status = {b.id: (b.status, b.replay_of) for b in s.ledger.history()}
    assert status == {b1: ("committed", None), b2: ("rolled_back", None), b3: ("replaced", None),
                      new: ("committed", b3)}
    assert {(f.status, f.batch_id) for f in s.ledger.facts(ids=[f.id for f in facts3])} == {("applied", new)}
    assert {f.status for f in s.ledger.batch_facts(b2)} == {"rolled_back"}
    assert any(e.kind == "replay" for e in s.ledger.events())
    # the rebuilt state on a fresh open matches what is in memory
    fresh = make_tiny_llama(len(tok))
    attach(Ledger(tmp_path), fresh, LAYERS)
    assert_layers_equal(fresh, layers_of(model), tol=0.0)


def test_rollback_to_restores_base(tmp_path, model):
    s = Session(tmp_path, model)
    base = layers_of(model)
    b1 = s.commit(1, seed=1)
    after1 = layers_of(model)
    s.commit(1, seed=2)
    s.commit(1, seed=3)
    reports = rollback_to(s.ledger, b1, model, s.state)
    assert len(reports) == 2
    assert_layers_equal(model, after1)
    rollback_to(s.ledger, 0, model, s.state)
    assert_layers_equal(model, base, tol=0.0)
    assert all(t.abs().max() < 1e-9 for t in s.state.kkt.values())
    assert {f.status for f in s.ledger.facts()} == {"rolled_back"}


def test_reopen_rebuilds_model_from_base_and_deltas(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    s.commit(2, seed=1)
    s.commit(2, seed=2)
    s.ledger.close()
    fresh = make_tiny_llama(len(tok))
    attach(Ledger(tmp_path), fresh, LAYERS)
    assert_layers_equal(fresh, layers_of(model), tol=0.0)


def test_attach_refuses_another_base_model(tmp_path, tok):
    Session(tmp_path, make_tiny_llama(len(tok))).commit(1, seed=1)
    with pytest.raises(LedgerMismatch, match="another model"):
        attach(Ledger(tmp_path), make_tiny_llama(len(tok), seed=5), LAYERS)


def test_commit_refuses_model_without_the_delta(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    facts = s.ledger.facts(ids=s.ledger.add_facts([fact(1)]))
    delta, keys = recompute_for(model)(facts)
    with pytest.raises(LedgerMismatch, match="differs"):
        commit_applied(s.ledger, model, facts, delta, keys)  # delta never applied
    assert s.ledger.history() == [] and s.ledger.facts()[0].status == "pending"


def test_crash_between_files_and_db_leaves_no_batch(tmp_path, tok, monkeypatch):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    s.commit(1, seed=1)
    committed = layers_of(model)
    facts = s.ledger.facts(ids=s.ledger.add_facts([fact(7)]))
    delta, keys = recompute_for(model)(facts)
    delta.apply(model)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(Ledger, "_record_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        commit_applied(s.ledger, model, facts, delta, keys)
    monkeypatch.undo()
    ledger = Ledger(tmp_path)
    fresh = make_tiny_llama(len(tok))
    attach(ledger, fresh, LAYERS)
    assert_layers_equal(fresh, committed, tol=0.0)
    assert len(ledger.history()) == 1 and ledger.fact(facts[0].id).status == "pending"
    assert ledger.verify() == []
    orphans = ledger.orphan_files()
    assert len(orphans) == 2 and ledger.gc() == orphans and ledger.orphan_files() == []


def test_verify_detects_tampered_delta_file(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    b1 = s.commit(1, seed=1)
    s.commit(1, seed=2)
    assert s.ledger.verify() == []
    path = tmp_path / "deltas" / f"{s.ledger.batch(b1).delta_hash}.safetensors"
    path.chmod(0o644)
    rand_delta(model, LAYERS, seed=99).save(path)
    problems = s.ledger.verify()
    assert len(problems) == 1 and f"batch {b1}" in problems[0] and "tampered" in problems[0]
    with pytest.raises(LedgerMismatch, match="tampered"):
        attach(Ledger(tmp_path), make_tiny_llama(len(tok)), LAYERS)


def test_verify_detects_db_pointing_at_missing_file_and_bad_fact_status(tmp_path, tok):
    s = Session(tmp_path, make_tiny_llama(len(tok)))
    b1 = s.commit(1, seed=1)
    (tmp_path / "keys" / f"{s.ledger.batch(b1).keys_hash}.safetensors").unlink()
    s.ledger.db.execute("UPDATE facts SET status = 'applied', batch_id = 42 WHERE id = 1")
    problems = s.ledger.verify()
    assert any("keys file" in p and "missing" in p for p in problems)
    assert any("fact 1 is applied but its batch 42" in p for p in problems)


def test_supersede_marks_on_commit_and_unmarks_on_rollback(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    s.commit(1, seed=1)
    old = s.ledger.facts(status="applied")[0]
    (new_id,) = s.ledger.add_facts([fact(100, target="Rome")])
    s.ledger.set_superseded_by([old.id], new_id)
    facts = s.ledger.facts(ids=[new_id])
    delta, keys = recompute_for(model)(facts)
    delta.apply(model)
    b2 = commit_applied(s.ledger, model, facts, delta, keys)
    assert s.ledger.fact(old.id).status == "superseded"
    rollback(s.ledger, b2, model, s.state)
    assert s.ledger.fact(old.id).status == "applied" and s.ledger.fact(old.id).superseded_by is None


def test_quarantine_only_pending(tmp_path, tok):
    s = Session(tmp_path, make_tiny_llama(len(tok)))
    s.commit(1, seed=1)
    applied = s.ledger.facts(status="applied")[0].id
    (pending,) = s.ledger.add_facts([fact(9)])
    s.ledger.quarantine([pending], "edit diverged twice")
    f = s.ledger.fact(pending)
    assert (f.status, f.reason) == ("quarantined", "edit diverged twice")
    with pytest.raises(LedgerError, match="only pending"):
        s.ledger.quarantine([applied], "x")
    assert s.ledger.events(kind="quarantine")[0].data["facts"] == [pending]


def test_metrics_probes_and_events_recorded(tmp_path, tok):
    s = Session(tmp_path, make_tiny_llama(len(tok)))
    b1 = s.commit(2, seed=1)
    s.ledger.add_metrics(b1, "before", {"efficacy": 0.0})
    s.ledger.add_probes(b1, [{"fact_id": 1, "kind": "rewrite", "prompt": "p", "expected": "Paris",
                              "output": "Paris", "correct": True}])
    assert s.ledger.metrics(b1) == {"before": {"efficacy": 0.0}, "after": {"efficacy": 1.0}}
    assert s.ledger.probes(b1)[0]["correct"] == 1
    assert [e.kind for e in s.ledger.events()][-1] == "commit"


def test_export_loads_with_plain_transformers(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path / "ledger", model)
    s.commit(2, seed=1)
    out = export(model, tok, s.ledger, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_layers_equal(loaded, layers_of(model), tol=0.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["subject"] for f in manifest["facts"]] == ["Entity100", "Entity101"]
    assert manifest["base_fingerprint"] == s.ledger.base_fingerprint()
    with pytest.raises(LedgerMismatch):  # a model that is not base + committed deltas is refused
        rand_delta(model, LAYERS, 5).apply(model)
        export(model, tok, s.ledger, tmp_path / "out2")


def test_export_of_a_model_dequantised_from_gguf_is_a_plain_checkpoint(tmp_path, tok):
    """The embedded SmolLM2 cache keeps `quantization_config: gguf` beside fp32 weights; export must still work."""
    src = tmp_path / "dequantised"
    make_tiny_llama(len(tok)).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (src / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    assert model.hf_quantizer is not None  # what every load of the cached SmolLM2 looks like
    s = Session(tmp_path / "ledger", model)
    s.commit(2, seed=1)
    fp = fingerprint(model)
    out = export(model, tok, s.ledger, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(loaded, "hf_quantizer", None) is None
    assert_layers_equal(loaded, layers_of(model), tol=0.0)
    assert model.hf_quantizer is not None and fingerprint(model) == fp  # the workspace's model is left as it was
