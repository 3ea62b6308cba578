"""Editors on tiny random models: closed forms, the unchanged-model contract, MPES, hooks, paths."""
from __future__ import annotations

import pytest
import torch

from editors.arch import UnknownArchitecture, arch_of, weight_view
from editors.core import cholesky_solve
from editors.hparams import EditHParams
from editors.keys import FullForwardKeys, LayerwiseKeys
from editors.prompts import EditRequest, context_ids, key_rows, value_rows
from editors.memit import Memit
from editors.registry import METHODS, DuplicateMethod, MethodRegistry, make_editor
from editors.state import EditorState
from editors.values import SuffixRunner, make_batch

CORPUS = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 60
REQUESTS = [EditRequest("{} is located in", "Eiffel Tower", "Rome"), EditRequest("The capital of {} is", "France", "Lyon")]
LAYERS = [1, 2]


def editor(method, model, tok, **kw):
    settings = dict(layers=LAYERS, stats_tokens=4000, max_steps=6, n_context=2, context_tokens=4, write="weights") | kw
    return make_editor(method, model, tok, corpus=CORPUS, **settings)


def snapshot(model):
    return {l: weight_view(model, l).clone() for l in LAYERS}


def brute_force(K, R, M):
    """argmin_D ||D K - R||^2 + tr(D M D^T) by least squares on a stacked system."""
    L = torch.linalg.cholesky(M)
    A = torch.cat([K, L], dim=1).T  # rows: constraints
    B = torch.cat([R, torch.zeros(R.shape[0], M.shape[0], dtype=R.dtype)], dim=1).T
    return torch.linalg.lstsq(A, B).solution.T


def test_memit_closed_form_matches_least_squares():
    torch.manual_seed(0)
    d_in, d_out, n = 12, 7, 5
    K, R = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    X = torch.randn(d_in, 40, dtype=torch.float64)
    M = X @ X.T / 40 + 0.3 * torch.eye(d_in, dtype=torch.float64)  # lambda C0 + sum K_p K_p^T + alpha I
    V = cholesky_solve(M + K @ K.T, K)
    assert torch.allclose(R @ V.T, brute_force(K, R, M), atol=1e-9)


def test_alpha_term_shrinks_the_update(tiny_llama, tok):
    memit = editor("memit", tiny_llama, tok).compute(REQUESTS)
    encore = editor("encore", tiny_llama, tok, alpha=50.0, stop="nll").compute(REQUESTS)
    for a, b in zip(memit.delta.layers, encore.delta.layers):
        assert b.dense().norm() < a.dense().norm()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", METHODS.names())
def test_compute_leaves_model_unchanged_and_deltas_are_exact(fixture, method, tok, request):
    model = request.getfixturevalue(fixture)
    ed = editor(method, model, tok)
    w0 = snapshot(model)
    result = ed.compute(REQUESTS)
    assert all(torch.equal(w0[l], weight_view(model, l)) for l in LAYERS)
    ed.apply(result)
    for d in result.delta.layers:
        assert torch.allclose(weight_view(model, d.layer) - w0[d.layer], d.dense().float(), atol=1e-6)
    assert ed.state.n_edits == len(REQUESTS)
    ed.revert(result)
    assert all(torch.allclose(w0[l], weight_view(model, l), atol=1e-6) for l in LAYERS)
    assert ed.state.n_edits == 0


def test_edit_changes_the_answer(tiny_llama, tok):
    from evaluators.scoring import target_nll

    ed = editor("encore", tiny_llama, tok, max_steps=25, lr=1.0, clamp_factor=4.0, mom2_weight=10.0, alpha=1.0)
    prompts = [r.text() for r in REQUESTS]
    before = target_nll(tiny_llama, tok, prompts, [r.target for r in REQUESTS])
    ed.edit(REQUESTS)
    after = target_nll(tiny_llama, tok, prompts, [r.target for r in REQUESTS])
    assert (after < before).all()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hooks_or_changes_left_after_an_exception(tiny_llama, tok, monkeypatch):
    ed = editor("encore", tiny_llama, tok)
    w0 = snapshot(tiny_llama)
    calls = []

    def failing_solve(layer, K, R):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return K * 0.01

    monkeypatch.setattr(ed, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="boom"):
        ed.compute(REQUESTS)
    assert _hook_count(tiny_llama) == 0
    assert all(torch.equal(w0[l], weight_view(tiny_llama, l)) for l in LAYERS)


@pytest.mark.parametrize("templates, requests", [
    (["Hello there, a longer context prefix than the others. {}", "A. {}"], REQUESTS),
    ([], [EditRequest("{} is located in", "X", "Rome")]),  # no row has a prefix: nothing fixed above the layer
])
def test_fast_suffix_path_equals_full_forward(tiny_llama, tok, templates, requests):
    rows = value_rows(tok, requests, templates)
    batch, P = make_batch(rows, 0, "cpu")
    if templates:
        assert set(batch.ctx.tolist()) == {-1, 0, 1}  # and computes each shared context once
    else:
        assert P == 0
    delta = torch.randn(len(rows), tiny_llama.config.hidden_size)
    outs = []
    for fast, contexts in ((True, context_ids(tok, templates)), (True, None), (False, None)):
        runner = SuffixRunner(tiny_llama, 1)
        runner.fast = fast
        runner.precompute(batch, P, contexts)
        outs.append((runner.run(delta), runner.run(torch.zeros_like(delta)), runner.h_layer()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.allclose(a, b, atol=1e-5)


def test_chat_forms_share_the_chat_prefix_and_the_fast_path_still_equals_a_full_forward(tiny_llama, tok):
    import copy

    from editors.prompts import chat_prefix, row_contexts

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}System: be brief and true. User: {{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %} Bot:{% endif %}")
    assert chat_tok.decode(chat_prefix(chat_tok)) == "System: be brief and true. User: "
    chat_form = ("System: be brief and true. User: Where is {}? Bot:", "Eiffel Tower")
    requests = [EditRequest("{} is located in", "Eiffel Tower", "Rome", forms=(chat_form, ("Where is {}?", "Eiffel Tower")))]
    templates = ["A. {}"]
    rows = value_rows(chat_tok, requests, templates, site="answer")
    assert [r.context for r in rows] == [-1, 0, 1, -1]  # the chat form lends its prefix, the plain form has none
    batch, P = make_batch(rows, 0, "cpu")
    delta = torch.randn(len(rows), tiny_llama.config.hidden_size)
    outs = []
    for fast, contexts in ((True, row_contexts(chat_tok, templates)), (False, None)):
        runner = SuffixRunner(tiny_llama, 1)
        runner.fast = fast
        runner.precompute(batch, P, contexts)
        outs.append((runner.run(delta), runner.h_layer()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


def test_layerwise_keys_follow_edits_below_like_full_forwards(tiny_llama, tok):
    templates = ["Hello there. {}", "A. {}"]
    seqs = key_rows(tok, REQUESTS, templates)
    streams = [LayerwiseKeys(tiny_llama, seqs, 0), LayerwiseKeys(tiny_llama, seqs, 0, context_ids(tok, templates))]
    assert len(streams[1].streams) == 3  # plain rows, and one stream per shared context
    full = FullForwardKeys(tiny_llama, seqs, 0)
    for stream in streams:
        assert torch.allclose(stream.keys(1), full.keys(1), atol=1e-5)
    with torch.no_grad():
        weight_view(tiny_llama, 1).add_(0.5 * torch.randn_like(weight_view(tiny_llama, 1)))  # edit below layer 2
    rows = torch.tensor([4, 0, 1])
    for stream in streams:
        assert torch.allclose(stream.keys(2), full.keys(2), atol=1e-5)
        assert torch.allclose(stream.outputs(2, rows), full.outputs(2, rows), atol=1e-5)
        with pytest.raises(ValueError):
            stream.keys(1)  # the stream cannot go back down


def test_alphaedit_update_spares_preserved_keys(tiny_llama, tok):
    ed = editor("alphaedit", tiny_llama, tok, nullspace_threshold=1e-3)
    result = ed.compute(REQUESTS)
    for d in result.delta.layers:
        P = ed.state.projections[d.layer]
        keep = torch.eye(P.shape[0], dtype=P.dtype) - P
        assert (d.dense() @ keep).abs().max() < 1e-8 * max(d.dense().abs().max(), 1)


def test_state_round_trips_through_a_file(tiny_llama, tok, tmp_path):
    ed = editor("encore", tiny_llama, tok)
    ed.edit(REQUESTS)
    ed.state.save(tmp_path / "state.safetensors")
    back = EditorState.load(tmp_path / "state.safetensors")
    assert back.context_templates == ed.state.context_templates and back.n_edits == 2
    assert all(torch.equal(back.kkt[l], ed.state.kkt[l]) for l in LAYERS)


def test_unknown_architecture_is_a_clear_error(tiny_llama):
    tiny_llama.config.model_type = "mystery"
    with pytest.raises(UnknownArchitecture, match="mystery"):
        arch_of(tiny_llama)


def test_hparams_are_validated():
    with pytest.raises(ValueError):
        EditHParams(layers=[1], stop="sometimes")


def test_a_method_name_is_registered_once():
    assert METHODS.names() == ["encore", "memit", "alphaedit"]

    class Twin(Memit):
        pass

    with pytest.raises(DuplicateMethod, match="'memit' is already registered"):
        METHODS.register(Twin)
    assert METHODS.get("memit") is Memit
    fresh = MethodRegistry()
    fresh.register(Twin)
    assert fresh.names() == ["memit"] and fresh.get("memit") is Twin
    with pytest.raises(ValueError, match="unknown method 'memitt'; choose from memit"):
        fresh.get("memitt")
