"""Limits on a feed line's size at intake, counted in the edited model's own tokens.

A schema-valid line whose prompt was a relation followed by a few thousand words made a batch take 24 GB; so each
text the editor or the probes will run is bounded, and so is the number of paraphrases and neighbours. Each limit
is a config key (agent/config.py, `max_*`); token limits are also capped so that a context prefix, the prompt and
the target fit in the model's positions. A line over a limit is a bad line like any other: one line naming the
line number, the field, the limit and the size found, e.g.

    line 7: field 'prompt': 3412 tokens with the subject filled in, over the limit of 64 (config key max_prompt_tokens)

Only the tokenizer is needed (`checker_for` loads it and the model's config, never the weights). Facts stored before a limit
existed or was lowered are checked again when they are planned (agent/admission.py) and quarantined with the same
reason, so a stored fact is never lost and never run.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from agent.config import AgentConfig
from editors.models import context_length, load_model_config, load_tokenizer
from memory.record import PLACEHOLDER, FactRecord

CONTEXT_ALLOWANCE = 32  # tokens kept free for the editor's context prefix ("{generated text}. {prompt}")


@dataclass(frozen=True)
class Limit:
    value: int  # the limit in force
    key: str  # the config key that sets it
    capped_by: int | None = None  # the model's positions, when they lowered the configured value

    def over(self, size: int, what: str) -> str | None:
        """The one-line reason when `size` is over the limit, else None."""
        if size <= self.value:
            return None
        cap = f", capped by the model's {self.capped_by} positions" if self.capped_by else ""
        return f"{size} {what}, over the limit of {self.value} (config key {self.key}{cap})"


def _token_limit(cfg: AgentConfig, key: str, fit: int | None, positions: int | None) -> Limit:
    value = getattr(cfg, key)
    if fit is not None and fit < value:
        return Limit(max(fit, 1), key, positions)
    return Limit(value, key)


@dataclass(frozen=True)
class FeedLimits:
    """The limits in force for one model and config."""

    prompt: Limit  # tokens of the prompt with the subject filled in
    target: Limit  # tokens of " " + target (and of old_target)
    paraphrases: Limit  # number of paraphrases
    paraphrase: Limit  # tokens of each paraphrase (subject filled in when it has a placeholder)
    neighbors: Limit  # number of neighbours
    neighbor_prompt: Limit  # tokens of each neighbour prompt
    neighbor_target: Limit  # tokens of each neighbour target
    aliases: Limit  # number of aliases
    alias: Limit  # tokens of each alias

    @classmethod
    def from_config(cls, cfg: AgentConfig, positions: int | None) -> "FeedLimits":
        """The configured limits, token limits capped so a context prefix, prompt and target fit `positions`."""
        fit = positions - cfg.max_target_tokens - CONTEXT_ALLOWANCE if positions else None
        target_fit = positions // 4 if positions else None
        return cls(_token_limit(cfg, "max_prompt_tokens", fit, positions),
                   _token_limit(cfg, "max_target_tokens", target_fit, positions),
                   Limit(cfg.max_paraphrases, "max_paraphrases"),
                   _token_limit(cfg, "max_paraphrase_tokens", fit, positions),
                   Limit(cfg.max_neighbors, "max_neighbors"),
                   _token_limit(cfg, "max_neighbor_prompt_tokens", fit, positions),
                   _token_limit(cfg, "max_neighbor_target_tokens", target_fit, positions),
                   Limit(cfg.max_aliases, "max_aliases"),
                   _token_limit(cfg, "max_alias_tokens", target_fit, positions))


def checker_for(cfg: AgentConfig, tok=None, model_config=None) -> "LimitChecker":
    """The checker of `cfg`'s limits for `cfg.model`; what is not given (tokenizer, model config) is loaded alone,
    never the weights."""
    model_config = model_config if model_config is not None else load_model_config(cfg.model)
    return LimitChecker(FeedLimits.from_config(cfg, context_length(model_config)), tok or load_tokenizer(cfg.model))


class LimitChecker:
    """Checks records against `limits` with the model's tokenizer `tok`."""

    def __init__(self, limits: FeedLimits, tok):
        self.limits, self.tok = limits, tok

    def tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def problem(self, record: FactRecord) -> tuple[str, str] | None:
        """(field, reason) of the first limit `record` is over, or None."""
        for field, reason in self._reasons(record):
            if reason:
                return field, reason
        return None

    def _reasons(self, record: FactRecord) -> Iterator[tuple[str, str | None]]:
        """Per field, the reason it is over its limit (None when within); lazily, counts before any tokenising."""
        lim = self.limits
        yield "paraphrases", lim.paraphrases.over(len(record.paraphrases), "paraphrases")
        yield "neighbors", lim.neighbors.over(len(record.neighbors), "neighbours")
        yield "aliases", lim.aliases.over(len(record.aliases), "aliases")
        yield "prompt", lim.prompt.over(self.tokens(record.text), "tokens with the subject filled in")
        yield "target", lim.target.over(self.tokens(" " + record.target), "tokens")
        if record.old_target is not None:
            yield "old_target", lim.target.over(self.tokens(" " + record.old_target), "tokens")
        for i, p in enumerate(record.paraphrases):
            yield f"paraphrases.{i}", lim.paraphrase.over(self.tokens(p.replace(PLACEHOLDER, record.subject, 1)),
                                                          "tokens")
        for i, n in enumerate(record.neighbors):
            yield f"neighbors.{i}.prompt", lim.neighbor_prompt.over(self.tokens(n.prompt), "tokens")
            yield f"neighbors.{i}.target", lim.neighbor_target.over(self.tokens(" " + n.target), "tokens")
        for i, a in enumerate(record.aliases):
            yield f"aliases.{i}", lim.alias.over(self.tokens(" " + a), "tokens")
