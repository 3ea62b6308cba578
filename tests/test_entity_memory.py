"""Entity memory on tiny models: matching, the untouched weights and other prompts, shared values, storage."""
from __future__ import annotations

import pytest
import torch

from editors.arch import weight_view
from editors.delta import EditDelta
from editors.entity_memory import EntityMemory, MemoryWrite
from editors.prompts import EditRequest
from editors.registry import make_editor

CORPUS = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 60
LAYERS = [1, 2]


def memory_editor(model, tok, **kw):
    """Subject-site slots (the value at the subject's last token), whose placement these tests check; answer-site
    slots (ENCORE's default) are tested in test_one_fact.py."""
    settings = dict(memory_site="subject", layers=LAYERS, stats_tokens=4000, max_steps=25, lr=1.0, clamp_factor=200.0, weight_decay=0.0, kl_factor=0.0, n_context=2,
                    context_tokens=4, write="memory") | kw
    return make_editor("encore", model, tok, corpus=CORPUS, **settings)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def logits(model, tok, text):
    return model(input_ids=torch.tensor([ids(tok, text)])).logits[0]


def test_matches_find_both_forms_and_the_longest_subject(tok):
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["Cairo", "Cairo Film"], torch.zeros(2, 4)))
    text = "Cairo Film is in Cairo"
    found = mem.matches(ids(tok, text))
    # "Cairo Film" ends at its last token; the shorter "Cairo" inside it does not fire at that position
    assert [(text[: t + 1], s) for t, s in found] == [("Cairo", "Cairo"), ("Cairo Film", "Cairo Film"),
                                                       ("Cairo Film is in Cairo", "Cairo")]
    assert mem.matches(ids(tok, "Lagos is in Nigeria")) == []


def test_a_nonfinite_slot_is_refused(tok):
    mem = EntityMemory(tok, layer=1)
    with pytest.raises(ValueError, match="'X'"):
        mem.write(MemoryWrite(1, ["X"], torch.tensor([[float("nan"), 0.0]])))
    assert mem.slots == {}


def test_memory_edit_answers_and_leaves_weights_and_other_prompts_alone(tiny_llama, tok):
    from evaluators.scoring import target_nll

    ed = memory_editor(tiny_llama, tok)
    req = EditRequest("{} is located in", "Eiffel Tower", "Rome")
    other = "The capital of France is"
    w0 = {l: weight_view(tiny_llama, l).clone() for l in LAYERS}
    before_other = logits(tiny_llama, tok, other)
    before = target_nll(tiny_llama, tok, [req.text()], [req.target])
    prompt = torch.tensor([ids(tok, req.text())])
    last = len(ids(tok, req.subject)) - 1  # the subject's last token
    with ed.memory.attached(tiny_llama):
        result = ed.edit([req])
        after = target_nll(tiny_llama, tok, [req.text()], [req.target])
        assert torch.equal(logits(tiny_llama, tok, other), before_other)
        h = tiny_llama(input_ids=prompt, output_hidden_states=True).hidden_states[LAYERS[-1] + 1][0, last]
    assert result.delta.layers == [] and result.delta.memory.subjects == ["Eiffel Tower"]
    assert all(torch.equal(w0[l], weight_view(tiny_llama, l)) for l in LAYERS)
    # the model with the memory holds at the subject exactly the value the optimisation found, and answers better
    assert torch.allclose(h, result.z[0], atol=1e-4)
    assert after < before - 1e-3
    # outside attached() the model is the base model and no hook is left
    assert torch.allclose(target_nll(tiny_llama, tok, [req.text()], [req.target]), before)
    hooks = [h for m in tiny_llama.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    assert not any(getattr(h, "__self__", None) is ed.memory for h in hooks)


def test_memory_layer_above_the_edited_layers_holds_the_value_there(tiny_llama, tok):
    ed = memory_editor(tiny_llama, tok, layers=[1], memory_layer=2)
    req = EditRequest("{} is located in", "Eiffel Tower", "Rome")
    last = len(ids(tok, req.subject)) - 1
    with ed.memory.attached(tiny_llama):
        result = ed.edit([req])
        hs = tiny_llama(input_ids=torch.tensor([ids(tok, req.text())]), output_hidden_states=True).hidden_states
    assert ed.memory.layer == 2 and result.delta.memory.layer == 2
    assert torch.allclose(hs[3][0, last], result.z[0], atol=1e-4)  # the value is the output of block 2
    assert not torch.allclose(hs[2][0, last], result.z[0], atol=1e-2)


def test_requests_about_one_subject_share_one_slot_and_keep_earlier_facts(tiny_llama, tok):
    from evaluators.scoring import target_nll

    ed = memory_editor(tiny_llama, tok, max_steps=40)
    first = EditRequest("{} is located in", "Eiffel Tower", "Rome")
    second = EditRequest("{} was designed by", "Eiffel Tower", "Gaudi")
    with ed.memory.attached(tiny_llama):
        ed.edit([first])
        result = ed.edit([second])
        nll = target_nll(tiny_llama, tok, [first.text(), second.text()], [first.target, second.target])
    # the second batch re-optimised the slot with the first fact as its companion: both answer
    assert result.delta.memory.subjects == ["Eiffel Tower"] and list(ed.memory.slots) == ["Eiffel Tower"]
    with ed.memory.suspended():
        base = target_nll(tiny_llama, tok, [first.text(), second.text()], [first.target, second.target])
    assert (nll < base - 1e-3).all()


def test_memory_slots_round_trip_through_delta_tensors():
    w = MemoryWrite(5, ["Eiffel Tower", "Zoë \u00e9"], torch.randn(2, 8))
    back = EditDelta.from_tensors(EditDelta([], w).tensors())
    assert back.layers == [] and back.memory.layer == 5 and back.memory.subjects == w.subjects
    assert torch.equal(back.memory.deltas, w.deltas)


def test_values_are_reused_for_the_same_group_on_the_same_weights(tiny_llama, tok):
    ed = memory_editor(tiny_llama, tok, max_steps=5)
    reqs = [EditRequest("{} is located in", "Eiffel Tower", "Rome"), EditRequest("{} is a", "Lagos", "poem")]
    first = ed.compute(reqs)
    half = ed.compute(reqs[1:])  # a bisected half: no optimisation again
    assert first.flops > 0 and half.flops == 0.0
    assert torch.equal(half.delta.memory.deltas, first.delta.memory.deltas[first.delta.memory.subjects.index("Lagos")][None])
    with ed.overriding(max_steps=6):  # other settings: optimised anew
        assert ed.compute(reqs[1:]).flops > 0
