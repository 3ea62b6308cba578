"""Intake limits in the model's tokens (agent/limits.py): every field's limit, the cap by the model's positions,
and the checker loading only the tokenizer and config."""
from __future__ import annotations

import pytest

from agent.config import AgentConfig
from agent.limits import FeedLimits, LimitChecker, checker_for
from memory.record import FactRecord


class CountingTok:
    """The toy tokenizer, counting the texts it is asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.tok(text, **kwargs)


def fact(**extra) -> FactRecord:
    return FactRecord(**({"subject": "Quito", "prompt": "{} is the capital of", "target": "Peru"} | extra))


@pytest.fixture
def checker(tok):
    return LimitChecker(FeedLimits.from_config(AgentConfig(), 256), tok)


@pytest.mark.parametrize("extra, field, message", [
    ({"prompt": "{} is " + "very " * 12 + "much in"}, "prompt",
     "76 tokens with the subject filled in, over the limit of 64 (config key max_prompt_tokens)"),
    ({"subject": "Quito" * 13}, "prompt", "83 tokens with the subject filled in, over the limit of 64"),
    ({"target": "Republic of Peru"}, "target", "17 tokens, over the limit of 16 (config key max_target_tokens)"),
    ({"old_target": "Republic of Chile"}, "old_target", "18 tokens, over the limit of 16"),
    ({"paraphrases": ["x"] * 17}, "paraphrases", "17 paraphrases, over the limit of 16 (config key max_paraphrases)"),
    ({"paraphrases": ["ok", "{} " + "p" * 62]}, "paraphrases.1",
     "68 tokens, over the limit of 64 (config key max_paraphrase_tokens)"),
    ({"neighbors": [{"prompt": "a", "target": "b"}] * 33}, "neighbors",
     "33 neighbours, over the limit of 32 (config key max_neighbors)"),
    ({"neighbors": [{"prompt": "n" * 65, "target": "b"}]}, "neighbors.0.prompt",
     "65 tokens, over the limit of 64 (config key max_neighbor_prompt_tokens)"),
    ({"neighbors": [{"prompt": "a", "target": "t" * 16}]}, "neighbors.0.target",
     "17 tokens, over the limit of 16 (config key max_neighbor_target_tokens)"),
])
def test_each_field_over_its_limit_is_named_with_the_limit_and_size(checker, extra, field, message):
    got = checker.problem(fact(**extra))
    assert got is not None and got[0] == field and got[1].startswith(message), got


def test_a_record_at_every_limit_passes(checker):
    at = fact(prompt="{} " + "p" * 58, target="t" * 15, old_target="o" * 15, paraphrases=["p" * 64] * 16,
              neighbors=[{"prompt": "n" * 64, "target": "t" * 15}] * 32)
    assert checker.problem(at) is None


def test_counts_are_checked_before_anything_is_tokenised(tok):
    counting = CountingTok(tok)
    checker = LimitChecker(FeedLimits.from_config(AgentConfig(), 256), counting)
    assert checker.problem(fact(paraphrases=[f"p{i}" for i in range(20_000)]))[0] == "paraphrases"
    assert counting.calls == 0


def test_token_limits_are_capped_by_the_model_positions(tok):
    limits = FeedLimits.from_config(AgentConfig(max_prompt_tokens=500, max_target_tokens=16), 96)
    assert (limits.prompt.value, limits.target.value, limits.paraphrase.value) == (48, 16, 48)
    got = LimitChecker(limits, tok).problem(fact(prompt="{} " + "p" * 50))
    assert got == ("prompt", "56 tokens with the subject filled in, over the limit of 48 "
                             "(config key max_prompt_tokens, capped by the model's 96 positions)")
    assert FeedLimits.from_config(AgentConfig(), None).prompt.value == 64  # a model that does not say


def test_the_checker_loads_the_tokenizer_and_config_but_not_the_weights(tmp_path, tok, tiny_llama, monkeypatch):
    import transformers

    tiny_llama.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")

    def no_weights(*args, **kwargs):
        raise AssertionError("the limits must not load the model's weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    checker = checker_for(AgentConfig(model=str(tmp_path / "m")))
    assert checker.limits.prompt.value == 64 and checker.tokens("Quito") == 5
