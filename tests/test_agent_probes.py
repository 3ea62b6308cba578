"""The agent's probe suite: the noise floor leaves the model exactly as it was; damage and excess are paired drops."""
from __future__ import annotations

import pytest
import torch

from agent.probes import ProbeSuite, random_drops
from conftest import rand_delta
from editors.arch import weight_view
from evaluators.probes import ProbeFact

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
