"""The probe suite the agent reads every batch: the noise floor leaves the model exactly as it was; damage and excess are paired drops."""
from __future__ import annotations

import pytest
import torch

from conftest import rand_delta
from editors.arch import weight_view
from evaluators.probes.damage import random_drops
from evaluators.probes.facts import ProbeFact
from evaluators.probes.suite import ProbeSuite

PROMPTS = ["abc def", "ghi jk", "lmn op q", "rs tu", "vw xyz", "the cat"]


@pytest.fixture
def suite() -> ProbeSuite:
    facts = [ProbeFact(prompt=p, subject=p[:2], target=p[-2:], dataset="t", record=i, source="prompt", margin=0.0)
             for i, p in enumerate(PROMPTS)]
    return ProbeSuite([], "some held-out text " * 40, 32, facts)


def test_random_drops_restore_the_weights_bit_for_bit_and_scale_with_the_update(tiny_llama, tok, suite):
    layers = [1, 2]
    saved = {l: weight_view(tiny_llama, l).clone() for l in layers}
    before = suite.read(tiny_llama, tok)
    small = random_drops(tiny_llama, tok, suite.facts, before.margins, rand_delta(tiny_llama, layers, 0), 2, 7)
    assert all(torch.equal(weight_view(tiny_llama, l), w) for l, w in saved.items())
    big = rand_delta(tiny_llama, layers, 0)
    for d in big.layers:
        d.u.mul_(40.0)
    large = random_drops(tiny_llama, tok, suite.facts, before.margins, big, 2, 7)
    assert small.shape == (len(PROMPTS),) and large.abs().mean() > small.abs().mean() > 0
    again = random_drops(tiny_llama, tok, suite.facts, before.margins, rand_delta(tiny_llama, layers, 0), 2, 7)
    assert torch.equal(again, small)  # seeded


def test_damage_and_excess_are_paired_drops_against_the_reference(tiny_llama, tok, suite):
    before = suite.reference(tiny_llama, tok)
    assert suite.reference(tiny_llama, tok) is before  # kept until the model changes
    delta = rand_delta(tiny_llama, [1], 3)
    delta.apply(tiny_llama)
    drops = before.margins - suite.read(tiny_llama, tok).margins
    after, m = suite.damage(tiny_llama, tok, before, drops)
    assert m["damage"] == pytest.approx(float(drops.mean())) and m["excess"] == pytest.approx(0.0, abs=1e-12)
    assert m["floor"] == pytest.approx(m["damage"]) and m["ppl_before"] == before.perplexity
    _, shifted = suite.damage(tiny_llama, tok, before, drops - 0.25)
    assert shifted["excess"] == pytest.approx(0.25) and shifted["excess_se"] == pytest.approx(0.0, abs=1e-9)
    _, plain = suite.damage(tiny_llama, tok, before, None)
    assert "excess" not in plain and plain["perplexity"] == after.perplexity
    suite.keep(after)
    assert suite.reference(tiny_llama, tok) is after



def test_known_acc_after_a_slot_batch_asks_only_facts_naming_its_subjects_and_equals_a_full_read(tiny_llama, tok,
                                                                                                  monkeypatch):
    from editors.entity_memory import EntityMemory, MemoryWrite
    from evaluators.probes.facts import KnownFact
    from evaluators.scoring import greedy_answers

    asked = []

    def hits(model, tok, facts, *args):  # the tiny model's answer, without the leading space greedy_matches wants
        asked.extend(f.prompt for f in facts)
        return torch.tensor([greedy_answers(model, tok, [f.prompt], 2)[0] == f.target for f in facts])

    monkeypatch.setattr("evaluators.probes.suite.known_fact_hits", hits)
    prompts = ["We met in Cairo", "The cat sat", "abc def", "Rome and"]
    known = [KnownFact(prompt=p, subject=p.split()[-1], target=a, case_id=i)
             for i, (p, a) in enumerate(zip(prompts, greedy_answers(tiny_llama, tok, prompts, 2)))]
    suite = ProbeSuite(known, "some held-out text " * 40, 32, [])
    before = suite.read(tiny_llama, tok)
    assert suite.known_acc(tiny_llama, tok, before)["known_acc"] == 1.0 and before.known.all()
    mem = EntityMemory(tok, layer=1)
    mem.write(MemoryWrite(1, ["Cairo"], 50.0 * torch.randn(1, tiny_llama.config.hidden_size,
                                                           generator=torch.Generator().manual_seed(0))))
    asked.clear()
    with mem.attached(tiny_llama):
        after = suite.read(tiny_llama, tok)
        reused = suite.known_acc(tiny_llama, tok, after, before, lambda text: not mem.matches(tok(text)["input_ids"]))
        assert asked == [prompts[0]]  # only the fact naming Cairo was asked again
        full = suite.known_acc(tiny_llama, tok)
    assert reused == full and full["known_acc"] == 0.75  # ... and the reuse agrees with asking all: Cairo's moved
    assert after.known.tolist() == [False, True, True, True]
