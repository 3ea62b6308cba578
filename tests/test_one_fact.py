"""One edit changes one fact: the memory's reach (casings, aliases), prompt-only matching, and keep prompts."""
from __future__ import annotations

import json

import pytest
import torch

from editors.entity_memory import EntityMemory, MemoryWrite, merge_writes
from editors.prompts import EditRequest, value_rows
from editors.registry import make_editor
from evaluators.scoring import greedy_matches, greedy_next_tokens
from memory.record import BadRecord, parse_line

CORPUS = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 60


@pytest.fixture(scope="module")
def lm():
    """A tiny llama pretrained a few steps on text, so that its greedy continuations vary (a random one repeats)."""
    from conftest import make_tiny_llama, pretrain, toy_tokenizer

    tok = toy_tokenizer()
    return pretrain(make_tiny_llama(len(tok)), tok, steps=60), tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_other_casings_and_aliases_fire_the_subjects_slot(tok):
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["New York"], torch.zeros(1, 4), {"New York": ["Big Apple"]}))
    for text in ["new york is", "NEW YORK is", "New York's mayor", "the Big Apple is", "the big apple is"]:
        assert [s for _, s in mem.matches(ids(tok, text))] == ["New York"], text
    assert mem.matches(ids(tok, "York is new")) == []
    # aliases survive a snapshot and a merge (what the ledger stores and replays)
    again = MemoryWrite.from_tensors(mem.snapshot().tensors())
    assert again.aliases == {"New York": ["Big Apple"]}
    assert merge_writes([again, MemoryWrite(1, ["New York"], torch.ones(1, 4))]).aliases == {}


def _slot_for_generated_token(model, tok, prompt: str):
    """A single-token subject the model generates after `prompt` (and that `prompt` does not hold), with a large
    slot (the residual there is ~1e3): if it fired where it is generated, later tokens would change."""
    gen = greedy_next_tokens(model, tok, [prompt], 6)[0]
    subject = next(tok.decode([t]) for t in gen[1:4] if tok.decode([t]).strip() and tok.decode([t]) not in prompt)
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, [subject], 2000 * torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))))
    return mem, gen


@pytest.mark.parametrize("prompt", ["Paris is the capital of", "The quick brown"])
def test_a_generated_subject_never_fires_and_every_decoder_agrees(lm, prompt):
    tiny_llama, tok = lm
    try:
        mem, unedited = _slot_for_generated_token(tiny_llama, tok, prompt)
    except StopIteration:
        pytest.skip("the tiny model generated no usable token")
    with mem.attached(tiny_llama):
        no_cache = greedy_next_tokens(tiny_llama, tok, [prompt], 6)[0]
        x = tok(prompt, return_tensors="pt")
        cached = tiny_llama.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, x.input_ids.shape[1]:]
        forced = greedy_matches(tiny_llama, tok, [prompt], [tok.decode(unedited).lstrip(" ")])
    assert no_cache == unedited  # the prompt does not name the subject: nothing fires, also where it is generated
    assert cached.tolist() == unedited
    assert tok.decode(unedited).startswith(" ") and bool(forced[0]) or not tok.decode(unedited).startswith(" ")


def test_a_slot_in_the_prompt_reaches_generated_tokens_alike_with_and_without_cache(lm):
    tiny_llama, tok = lm
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["Paris"], 2000 * torch.randn(1, 32, generator=torch.Generator().manual_seed(1))))
    prompt = "The capital of France is Paris"  # the tiny model attends mostly nearby: the subject ends the prompt
    before = greedy_next_tokens(tiny_llama, tok, [prompt], 5)[0]
    with mem.attached(tiny_llama):
        no_cache = greedy_next_tokens(tiny_llama, tok, [prompt], 5)[0]
        x = tok(prompt, return_tensors="pt")
        cached = tiny_llama.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, x.input_ids.shape[1]:]
    assert no_cache != before  # the slot fires in the prompt
    assert cached.tolist() == no_cache


def test_value_rows_hold_forms_and_keep_prompts_with_their_weights(tok):
    req = EditRequest("{} is located in", "Eiffel Tower", "Rome",
                      forms=(("Where is {}?", "Eiffel Tower"), ("{} is located in", "eiffel tower")),
                      keep=("{} was built by", "{} is made of"))
    rows = value_rows(tok, [req], ["Hi. {}"], kl_factor=0.5, keep_factor=2.0)
    targets = [r for r in rows if not r.is_kl]
    kl = [r for r in rows if r.is_kl]
    assert len(targets) == 2 + 2  # the prompt, in the plain and one context template, and the two forms
    assert [r.kl_weight for r in kl] == [0.5, 1.0, 1.0]  # "{} is a", then the keep prompts sharing keep_factor
    lower = targets[3]
    assert tok.decode(lower.prefix + lower.suffix[:1]).endswith("eiffel tower")  # the delta sits on its own subject


def _keep_kl(model, tok, req: EditRequest, delta: torch.Tensor, layer: int) -> float:
    """Mean KL(edited || unedited) of the next token after each keep prompt, with `delta` at the subject."""
    mem = EntityMemory(tok, layer)
    mem.write(MemoryWrite(layer, [req.subject], delta[None]))
    total = 0.0
    for t in req.keep:
        x = torch.tensor([ids(tok, t.replace("{}", req.subject))])
        p0 = model(input_ids=x).logits[0, -1].log_softmax(-1)
        with mem.attached(model):
            p1 = model(input_ids=x).logits[0, -1].log_softmax(-1)
        total += float((p1.exp() * (p1 - p0)).sum())
    return total / len(req.keep)


def test_keep_prompts_hold_the_subjects_other_answers(tiny_llama, tok):
    # the tiny model attends mostly nearby, so the keep prompts end with the subject (its slot moves their next token)
    req = EditRequest("{} is located in", "Paris", "Rome", keep=("I was in {}", "The mayor of {}"))
    kls = []
    for keep_factor in (0.0, 20.0):
        ed = make_editor("encore", tiny_llama, tok, corpus=CORPUS, layers=[1, 2], stats_tokens=4000, max_steps=30,
                         lr=1.0, clamp_factor=200.0, weight_decay=0.0, kl_factor=0.0, n_context=1, context_tokens=3,
                         write="memory", memory_site="subject", stop="nll", nll_stop=0.0, keep_factor=keep_factor)
        result = ed.compute([req])
        kls.append(_keep_kl(tiny_llama, tok, req, result.delta.memory.deltas[0], ed.hp.value_layer))
    assert kls[1] < 0.5 * kls[0]


def test_an_edit_of_a_description_prompt_is_keyed_apart_from_its_own_prompt(tiny_llama, tok):
    """An edit whose prompt is one of its subject's descriptions ("Paris is a" -> ...) must not count that prompt
    among the ones its slot must not fire on: the slot's key for it would get radius 1 and fire only by float luck."""
    req = EditRequest("{} is a", "Paris", "city", keep=("{} is located in", "{} was built by"))
    ed = make_editor("encore", tiny_llama, tok, corpus=CORPUS, layers=[1, 2], stats_tokens=4000, n_context=1,
                     context_tokens=3, write="memory", memory_site="answer")
    keys, radii = ed.answer_keys([req], ["Paris"])
    real = radii[0][~torch.isnan(radii[0])]
    assert (real < 1 - 1e-4).all()  # every key fires a margin inside its radius, the edit prompt's included


def test_answer_site_keys_reuse_the_value_rows_states_and_equal_a_fresh_reading(tiny_llama, tok):
    """The slot's keys for the edit prompt in every context and for its forms come from the value optimisation's own
    rows (read once); they must be the keys a separate reading of those prompts gives."""
    req = EditRequest("{} is located in", "Paris", "Rome", forms=(("Where is {}?", "Paris"),),
                      keep=("{} was built by",))
    ed = make_editor("encore", tiny_llama, tok, corpus=CORPUS, layers=[1, 2], stats_tokens=4000, n_context=1,
                     context_tokens=3, write="memory", memory_site="answer", max_steps=2)
    write = ed.compute([req]).delta.memory
    assert len(ed.values_for([req], [0]).states) == 3  # the plain prompt, its one context and its form
    keys, radii = ed.answer_keys([req], ["Paris"])  # read afresh
    assert torch.allclose(write.keys, keys, atol=1e-4) and torch.allclose(write.radii, radii, atol=1e-4, equal_nan=True)


def test_aliases_are_names_and_are_stored(tok):
    line = {"subject": "New York", "prompt": "{} is in", "target": "Texas", "aliases": ["Big Apple", "NYC"]}
    assert parse_line(json.dumps(line), 1).aliases == ["Big Apple", "NYC"]
    with pytest.raises(BadRecord, match="line 2: field 'aliases': .*placeholder"):
        parse_line(json.dumps(line | {"aliases": ["{} City"]}), 2)
    with pytest.raises(BadRecord, match="line 3: field 'aliases.0': .*U\\+202E"):
        parse_line(json.dumps(line | {"aliases": ["Big\u202eApple"]}), 3)


def test_answer_site_keys_fire_their_forms_and_not_the_subjects_other_prompts():
    from editors.entity_memory import keys_and_radii

    g = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    pos, neg = unit(torch.randn(3, 16, generator=g)), unit(torch.randn(4, 16, generator=g))
    keys, radii = keys_and_radii(pos, neg, margin=0.25)
    assert ((pos * keys).sum(1) >= radii).all()  # each form is within its own key's radius
    assert ((neg @ keys.T) < radii).all()  # no prompt that must not fire it is within any radius


def test_an_answer_site_slot_fires_at_the_prompts_end_only_where_its_key_matches(lm):
    from editors.entity_memory import keys_and_radii, last_states

    model, tok = lm
    asked, other = "The capital of Paris is", "Paris was built by"
    keys, radii = keys_and_radii(*(last_states(model, tok, [t], 1) for t in (asked, other)), margin=0.5)
    delta = 2000 * torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["Paris"], delta, keys=keys[None], radii=radii[None]))
    x, y = (torch.tensor([ids(tok, t)]) for t in (asked, other))
    before = model(input_ids=x).logits[0], model(input_ids=y).logits[0]
    with mem.attached(model):
        after = model(input_ids=x).logits[0], model(input_ids=y).logits[0]
    assert torch.equal(after[0][:-1], before[0][:-1])  # nothing before the prompt's last token moves
    assert not torch.allclose(after[0][-1], before[0][-1])  # the asked relation gets the value
    assert torch.equal(after[1], before[1])  # the same subject asked something else: untouched
    stored = MemoryWrite.from_tensors(mem.snapshot().tensors())
    assert torch.equal(stored.keys, keys[None]) and torch.equal(stored.radii, radii[None])


def test_the_check_asks_again_only_the_prompts_on_which_a_slot_fires(lm):
    """The same-subject check skips, after a slots-only batch, each statement on which no slot fires: its answer with
    the memory must then be the answer without it, token for token, and the state read while answering is the one the
    gate compares."""
    from editors.entity_memory import keys_and_radii, last_states
    from evaluators.specificity import Probe, generate_answers

    model, tok = lm
    asked, other, elsewhere = "The capital of Paris is", "Paris was built by", "The fox jumps over the"
    keys, radii = keys_and_radii(*(last_states(model, tok, [t], 1) for t in (asked, other)), margin=0.5)
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["Paris"], 2000 * torch.randn(1, 32, generator=torch.Generator().manual_seed(2)),
                          keys=keys[None], radii=radii[None]))
    probes = [Probe(t, 4) for t in (asked, other, elsewhere)]
    with mem.attached(model):
        with mem.suspended():
            before = generate_answers(model, tok, probes, state_layer=1)
        after = generate_answers(model, tok, probes)
    fires = [mem.fires(tok(p.prompt).input_ids, b.state) for p, b in zip(probes, before)]
    assert fires == [True, False, False]
    assert abs(after[0].first_p - before[0].first_p) > 0.1  # where it fires, the slot moves the answer
    assert [(a.text, round(a.first_p, 5)) for a in after[1:]] == [(b.text, round(b.first_p, 5)) for b in before[1:]]
    unit = torch.nn.functional.normalize(before[0].state, dim=0)
    assert torch.allclose(unit, last_states(model, tok, [asked], 1)[0], atol=1e-5)


def test_cues_key_the_relations_other_train_phrasings_and_are_never_trained_or_measured(tok):
    from evaluators.edit_forms import FormSettings, enrich
    from evaluators.relations import RelationBank

    bank = RelationBank.load()
    rel = bank.relation("P36")
    req = enrich(EditRequest("The capital of {} is", "France", "Lyon"), bank, tok, FormSettings(phrasings=1, cues=3),
                 "P36")
    assert len(req.cues) == min(3, len(rel.templates("train")) - 2) > 0
    cued = {t for t, _ in req.cues}
    assert cued <= set(rel.templates("train")) and not cued & set(rel.templates("test"))
    assert not cued & {t for t, _ in req.forms} and "The capital of {} is" not in cued
    assert req.key == enrich(EditRequest("The capital of {} is", "France", "Lyon"), bank, tok,
                             FormSettings(phrasings=1, cues=0), "P36").key  # keys only: the value does not change


def test_the_discriminant_key_fires_on_new_forms_of_the_relation_and_never_on_a_negative():
    from editors.entity_memory import keys_and_radii

    g = torch.Generator().manual_seed(1)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    # states share the subject's direction; the relation asked moves them a little
    subject, relation, others = (unit(torch.randn(n, 32, generator=g)) for n in (1, 1, 4))
    pos = unit(subject + 0.5 * relation + 0.3 * torch.randn(8, 32, generator=g))  # phrasings of the edited relation
    neg = unit(subject + 0.5 * others.repeat(2, 1) + 0.3 * torch.randn(8, 32, generator=g))  # its other relations
    new = unit(subject + 0.5 * relation + 0.3 * torch.randn(50, 32, generator=g))  # phrasings no key was made from
    fired = lambda k, r, x: int(((x @ k.T) >= r).any(1).sum())  # noqa: E731
    keys, radii = keys_and_radii(pos, neg, 0.25, discriminant=0.25)
    assert len(keys) == len(pos) + 1 and not ((neg @ keys.T) >= radii).any()
    assert fired(keys, radii, new) >= 40 > 10 >= fired(*keys_and_radii(pos, neg, 0.25), new)


def test_a_recalling_slot_fires_where_the_model_would_give_its_old_answer_and_every_decoder_agrees(lm):
    """With `answers`, an answer-site slot whose keys match nothing still fires at a prompt's end where the model
    without the memory would answer one of them (a phrasing no key covers), and nowhere else; `fires` says so from the
    answer read without the memory, and greedy decoding with and without a KV cache agree."""
    from editors.entity_memory import recall_tokens
    from evaluators.specificity import Probe, generate_answers

    model, tok = lm
    prompt = "Paris is the capital of"
    old = greedy_next_tokens(model, tok, [prompt], 1)[0][0]
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    delta = 2000 * torch.randn(1, 32, generator=torch.Generator().manual_seed(2))

    def memory(answer: int) -> EntityMemory:  # keys that match nothing (radius above any cosine)
        mem = EntityMemory(tok, layer=1)
        mem.write(MemoryWrite(1, ["Paris"], delta, keys=keys, radii=torch.full((1, 1), 1.5),
                              answers={"Paris": [answer]}))
        return mem

    probe = [Probe(prompt, 4)]
    runs = {}
    for answer in (old, old + 1):
        mem = memory(answer)
        with mem.attached(model):
            with mem.suspended():
                before = generate_answers(model, tok, probe, state_layer=1)[0]
            after = generate_answers(model, tok, probe)[0]
            no_cache = greedy_next_tokens(model, tok, [prompt], 4)[0]
            x = tok(prompt, return_tensors="pt")
            cached = model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, x.input_ids.shape[1]:]
        assert before.token == old and cached.tolist() == no_cache
        runs[answer] = (mem.fires(tok(prompt).input_ids, before.state, before.token), before, after)
    fired, before, after = runs[old]
    assert fired and abs(after.first_p - before.first_p) > 0.1  # where the model would say its old answer, it acts
    fired, before, after = runs[old + 1]
    assert not fired and (after.text, round(after.first_p, 5)) == (before.text, round(before.first_p, 5))
    assert memory(old).fires(tok(prompt).input_ids, before.state, None)  # an answer not read counts as firing
    assert MemoryWrite.from_tensors(memory(old).snapshot().tensors()).answers == {"Paris": [old]}
    assert recall_tokens(model, tok, [prompt]) == [old if len(tok.decode([old]).strip()) >= 3 else None]
