"""Model dtype and device: the editors, the ledger and the watch loop on a bf16 tiny model on CPU; --device cuda
without CUDA is a one-line error; the fast path passes the KV cache the way transformers wants (no FutureWarning)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import agent.session
from conftest import ToyEmbedder, make_tiny_gpt2, make_tiny_llama, one_thread
from editors.arch import weight_view
from editors.delta import add_low_rank
from editors.models import DeviceUnavailable, pick_device, pick_dtype
from editors.prompts import EditRequest
from editors.registry import make_editor
from memory.blobs import _fingerprint_v1, layer_fingerprint, weight_rtol
from memory.ledger import Ledger, LedgerMismatch
from memory.model_sync import attach, load_into, rollback_to
from test_cli import model_dir, run  # noqa: F401  (the CLI tests' tiny model on disk, and their runner)
from test_ledger import LAYERS, Session

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
REQUESTS = [EditRequest(prompt="{} is the capital of", subject="Paris", target="Spain"),
            EditRequest(prompt="{} is the capital of", subject="Rome", target="Chile")]
FAST = dict(layers=[1, 2], max_steps=4, n_context=1, context_tokens=3, stats_tokens=2000)


def bf16(model):
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One KAGENT_HOME for the module: the tiny models' covariance statistics are computed once per dtype."""
    return tmp_path_factory.mktemp("kagent-home-dtype")


@pytest.fixture(autouse=True)
def home(monkeypatch, shared_home):
    monkeypatch.setenv("KAGENT_HOME", str(shared_home))
    monkeypatch.setattr(agent.session, "default_embedder", ToyEmbedder)
    with one_thread():
        yield shared_home


def test_auto_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16


@NO_CUDA
def test_cuda_without_cuda_is_a_one_line_error(tmp_path):
    with pytest.raises(DeviceUnavailable):
        pick_device("cuda")
    for args in (["init", "--device", "cuda", "--workspace", tmp_path / "ws"],
                 ["bench", "--facts", __file__, "--device", "cuda:0", "--n", "1"]):
        res = run(*args)
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert res.output.startswith("Error: --device cuda") and "CUDA is not available" in res.output
    assert not (tmp_path / "ws").exists()


def test_the_fast_path_raises_no_future_warning(tok):
    model = make_tiny_llama(len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecations are FutureWarnings
        editor = make_editor("encore", model, tok, **FAST)
        editor.compute(REQUESTS)


def test_low_rank_delta_is_formed_in_fp32_and_cast_once():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g).bfloat16()
    u, v = torch.randn(8, 2, generator=g), torch.randn(6, 2, generator=g)
    expected = (w.float() + u @ v.T).bfloat16()
    add_low_rank(w, u, v)
    assert torch.equal(w, expected)
    w32 = torch.randn(8, 6, generator=g)
    plain = w32 + u @ v.T
    add_low_rank(w32, u, v)
    assert torch.equal(w32, plain)  # fp32 weights: exactly the former w.add_(U V^T)


@pytest.mark.parametrize("method,write", [("encore", "memory"), ("encore", "weights"), ("memit", "weights"),
                                          ("alphaedit", "weights")])
def test_editors_on_a_bf16_model_keep_values_and_deltas_in_fp32(tok, method, write):
    model = bf16(make_tiny_llama(len(tok)))
    editor = make_editor(method, model, tok, write=write, **FAST)
    before = {l: weight_view(model, l).clone() for l in FAST["layers"]}
    result = editor.compute(REQUESTS)
    assert all(torch.equal(weight_view(model, l), w) for l, w in before.items())  # model unchanged
    assert result.z.dtype == torch.float32 and torch.isfinite(result.z).all()
    editor.apply(result)
    for d in result.delta.layers:
        assert d.u.dtype == d.v.dtype == torch.float32
        assert torch.equal(weight_view(model, d.layer), (before[d.layer].float() + d.u @ d.v.T).bfloat16())
    if write == "memory":
        assert result.delta.memory.deltas.dtype == torch.float32
        with editor.memory.attached(model):
            out = model(**tok(["Paris is the capital of"], return_tensors="pt")).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(st.mom2.dtype == torch.float64 for st in editor.stats.values())
    assert all(t.dtype == torch.float64 for t in editor.state.kkt.values())


def test_gpt2_in_bf16_takes_the_generic_path(tok):
    model = bf16(make_tiny_gpt2(len(tok)))
    editor = make_editor("memit", model, tok, **FAST)
    editor.apply(editor.compute(REQUESTS[:1]))
    assert all(torch.isfinite(weight_view(model, l).float()).all() for l in FAST["layers"])


def test_ledger_on_a_bf16_model_rebuilds_bit_for_bit_and_rolls_back(tmp_path, tok):
    model = bf16(make_tiny_llama(len(tok)))
    base = {l: weight_view(model, l).clone() for l in LAYERS}
    s = Session(tmp_path, model)
    s.commit(2, seed=1)
    s.commit(1, seed=2)
    live = {l: weight_view(model, l).clone() for l in LAYERS}
    fresh = bf16(make_tiny_llama(len(tok)))
    with Ledger(tmp_path) as again:
        attach(again, fresh, LAYERS)
        assert again.verify() == []
    assert all(torch.equal(weight_view(fresh, l), w) for l, w in live.items())
    rollback_to(s.ledger, 0, model, s.state)
    assert all(torch.equal(weight_view(model, l), w) for l, w in base.items())
    s.ledger.close()


def test_weight_tolerance_follows_the_dtype():
    assert weight_rtol(torch.float32) == 2e-5
    assert weight_rtol(torch.float16) > weight_rtol(torch.float32)
    assert weight_rtol(torch.bfloat16) > weight_rtol(torch.float16)


def test_a_ledger_holding_format_1_fingerprints_still_verifies(tmp_path, tok):
    model = make_tiny_llama(len(tok))
    s = Session(tmp_path, model)
    s.commit(2, seed=1)
    weights = s.ledger.expected_weights()
    stored = json.loads(s.ledger._meta("layers_fingerprint"))
    assert all(fp["v"] == 2 for fp in stored.values())
    old = {str(l): _fingerprint_v1(w, l) for l, w in weights.items()}  # what kagent wrote before format 2
    with s.ledger.transaction():
        s.ledger._set_meta("layers_fingerprint", json.dumps(old))
    assert s.ledger.verify() == []
    load_into(s.ledger, model)
    old[str(LAYERS[0])][1] += 1.0  # a tampered old fingerprint is still caught
    with s.ledger.transaction():
        s.ledger._set_meta("layers_fingerprint", json.dumps(old))
    s.ledger._expected = None
    with pytest.raises(LedgerMismatch):
        load_into(s.ledger, model)
    s.ledger.close()


def test_format_2_fingerprint_costs_out_plus_in_random_numbers_and_tracks_the_weight():
    w = torch.randn(64, 32, dtype=torch.float64)
    fp = layer_fingerprint(w, 3)
    assert fp["v"] == 2 and len(fp["fp"]) == 5 and abs(fp["fp"][0] - float(w.norm())) < 1e-9
    moved = w.clone()
    moved[0, 0] += 1e-2 * float(w.norm())
    assert layer_fingerprint(moved, 3)["fp"] != fp["fp"]




@pytest.fixture(scope="module")
def bf16_ws(tmp_path_factory, model_dir, shared_home):
    """A workspace initialised once in bf16 with small probes; tests get copies."""
    from agent.workspace import Workspace

    from editors.corpus import stats_text

    root = tmp_path_factory.mktemp("bf16") / "ws"
    corpus = root.parent / "stats.txt"  # a user's statistics corpus (--stats-corpus), read through the session
    corpus.write_text(stats_text()[:6000])
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setattr(agent.session, "default_embedder", ToyEmbedder)
        mp.setenv("KAGENT_HOME", str(shared_home))
        res = run("init", "--model", model_dir, "--layers", "1,2", "--stats-tokens", "2000", "--dtype", "bfloat16",
                  "--stats-corpus", corpus, "--workspace", root)
    assert res.exit_code == 0, res.output
    assert "(encore, bfloat16)" in res.output and "encore settings: layers 1-2, lambda 3000" in res.output
    ws = Workspace.open(root)
    assert ws.config().dtype == "bfloat16" and ws.config().stats_corpus == str(corpus.resolve())
    assert list((shared_home / "cache" / "stats").glob("*-u*-2000.safetensors"))  # statistics of the user corpus
    ws.save_config(ws.config().model_copy(update={"probe_tokens": 128, "probe_facts": 4, "retention_sample": 4}))
    return root


# FAKE (conftest.every_fact_answers): every fact answers; the tiny random model cannot, and this test is about bf16
# plumbing (the ledger, verify, export), not whether edits take.
@pytest.mark.usefixtures("facts_answer")
def test_watch_rollback_verify_export_on_a_bf16_workspace(tmp_path, bf16_ws):
    """The agent's default (ENCORE into the entity memory) end to end in bf16; weight writes in bf16 are the ledger
    test's and the editor tests' (a weights-mode watch adds 30 s of guard probes to the fast tier)."""
    from agent.workspace import Workspace

    ws = Path(shutil.copytree(bf16_ws, tmp_path / "ws"))
    cfg = Workspace.open(ws).config()
    Workspace.open(ws).save_config(cfg.model_copy(update={"editor": {"max_steps": 4}}))
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(json.dumps({"subject": s, "prompt": "{} is the capital of", "target": t}) + "\n"
                            for s, t in [("Paris", "Spain"), ("Berlin", "Norway")]))
    res = run("watch", feed, "--once", "--batch-size", "1", "--workspace", ws)
    assert res.exit_code == 0, res.output
    hist = json.loads(run("history", "--json", "--workspace", ws).output)
    assert [h["status"] for h in hist] == ["committed", "committed"]
    assert run("verify", "--workspace", ws).exit_code == 0
    assert run("ask", "Paris is the capital of", "--workspace", ws).exit_code == 0
    out = tmp_path / "export"
    assert run("export", out, "--workspace", ws).exit_code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # export keeps the model's dtype
    res = run("rollback", "1", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert run("verify", "--workspace", ws).exit_code == 0


def test_device_map_auto_loads_through_accelerate_and_edits(model_dir):
    """On a CPU-only machine accelerate maps every block to the CPU; the load path and the editor run the same."""
    from editors.models import load_model

    lm = load_model(str(model_dir), dtype="bfloat16", device_map="auto")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    editor = make_editor("encore", lm.model, lm.tok, write="weights", **FAST)
    editor.apply(editor.compute(REQUESTS[:1]))


def test_bench_rows_record_device_dtype_and_no_gpu_peak_without_cuda(tok):
    from evaluators.bench import MethodResult, placement

    assert placement(bf16(make_tiny_llama(len(tok)))) == {"device": "cpu", "dtype": "bfloat16"}
    fields = MethodResult.model_fields
    assert {"device", "dtype", "peak_gpu_mb"} <= fields.keys() and fields["peak_gpu_mb"].default is None
