"""Frontier movers of the weight write on tiny random models (issue 15): target values optimised on the base
weights and shared between editors, NAS norm anchoring, SPHERE's projection, and the `kagent bench` rows that
measure them."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from editors.arch import weight_view
from editors.movers import anchored, principal_complement
from editors.prompts import EditRequest
from test_editors import REQUESTS, editor, snapshot

MORE = [EditRequest("{} is made of", "Moon", "cheese"), EditRequest("{} was born in", "Mozart", "Oslo")]


def on_base(model, tok, **kw):
    ed = editor("encore", model, tok, stop="nll", values_on="base", **kw)
    ed.base = snapshot(model)
    return ed


def test_values_on_the_base_weights_ignore_earlier_edits(tiny_llama, tok):
    first, second = on_base(tiny_llama, tok), on_base(tiny_llama, tok)
    current = editor("encore", tiny_llama, tok, stop="nll")
    want = first.compute(MORE).z
    torch.manual_seed(1)
    for layer in (1, 2):  # earlier edits: the edited layers now differ from their base
        w = weight_view(tiny_llama, layer)
        w.add_(0.5 * w.std() * torch.randn_like(w))
    after = weight_view(tiny_llama, 2).clone()
    assert torch.allclose(second.compute(MORE).z, want, rtol=0, atol=1e-7)
    moved = (current.compute(MORE).z - want).abs().max()
    assert moved > 1e-2 * want.abs().max(), moved  # on the edited weights they differ
    assert torch.equal(weight_view(tiny_llama, 2), after)  # and computing them left the edited model as it was


def test_values_on_base_are_shared_by_editors_with_the_same_value_settings(tiny_llama, tok):
    a, b = on_base(tiny_llama, tok), on_base(tiny_llama, tok, layers=[0, 2], alpha=3.0)  # another solve
    b.value_cache = a.value_cache
    ra = a.compute(MORE)
    rb = b.compute(MORE)
    assert ra.flops > 0 and rb.flops == 0.0 and torch.equal(ra.z, rb.z)
    c = on_base(tiny_llama, tok, lr=1.0)  # other value settings: computed again
    c.value_cache = a.value_cache
    assert c.compute(MORE).flops > 0


def test_values_on_base_without_base_weights_is_a_clear_error(tiny_llama, tok):
    with pytest.raises(ValueError, match="base weights"):
        editor("encore", tiny_llama, tok, values_on="base").compute(MORE)


def test_nas_rescales_every_value_to_the_anchor_and_skips_outliers():
    torch.manual_seed(0)
    h0, v0 = torch.randn(6, 8), torch.randn(6, 8) / 8 ** 0.5  # ||v0|| about 1
    z = h0 + 0.3 * torch.randn(6, 8) / 8 ** 0.5
    z[0] = h0[0] + 50 * torch.randn(8)  # an outlier
    out, skip = anchored(z, h0, v0, anchor=3.0, factor=2.0)
    assert skip.tolist() == [True] + [False] * 5
    assert torch.equal(out[0], h0[0])  # left unedited
    assert torch.allclose((v0 + out - h0)[1:].norm(dim=1), torch.full((5,), 3.0), atol=1e-5)


def test_nas_measures_its_anchor_on_the_first_batch_and_keeps_it(tiny_llama, tok):
    ed = on_base(tiny_llama, tok, nas_factor=2.0)
    ed.edit(REQUESTS)
    anchor = ed.state.value_anchor
    assert anchor > 0
    ed.edit(MORE)
    assert ed.state.value_anchor == anchor


def test_sphere_keeps_the_update_off_the_weights_principal_directions(tiny_llama, tok):
    w = weight_view(tiny_llama, 2)
    P = principal_complement(w, 0.5)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T)
    assert 0 < int(round(float(torch.trace(torch.eye(len(P), dtype=P.dtype) - P)))) < w.shape[0]
    ed = editor("encore", tiny_llama, tok, stop="nll", protect_energy=0.5)
    plain = editor("encore", tiny_llama, tok, stop="nll").compute(REQUESTS)
    result = ed.compute(REQUESTS)
    for layer, free in zip(result.delta.layers, plain.delta.layers):
        protected = torch.eye(len(P), dtype=torch.float64) - ed.protection(layer.layer)
        assert float((layer.dense().double() @ protected).norm()) < 1e-5 * float(layer.dense().norm())
        assert float((free.dense().double() @ protected).norm()) > 1e-2 * float(free.dense().norm())
    with pytest.raises(ValueError, match="protect_energy"):
        principal_complement(w, 1.0)


def test_bench_variants_parse_and_a_bad_one_is_a_usage_error():
    from agent.cli import cli
    from evaluators.bench import Variant

    v = Variant.parse("blue: layers=[3,7] values_on=base order=spread consolidate_every=5")
    assert (v.name, v.method, v.order, v.consolidate_every) == ("blue", "encore", "spread", 5)
    assert v.overrides == {"layers": [3, 7], "values_on": "base"}
    assert Variant.parse("m: method=memit").method == "memit"
    for bad in ["no colon", "x: method=nosuch", "x: order=sideways", "x: lr"]:
        res = CliRunner().invoke(cli, ["bench", "--facts", __file__, "--variant", bad])
        assert res.exit_code == 2 and "--variant" in res.output, (bad, res.output)
    res = CliRunner().invoke(cli, ["bench", "--facts", __file__, "--set", "lr"])
    assert res.exit_code == 2 and "'lr' is not KEY=VALUE" in res.output, res.output
