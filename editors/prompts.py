"""Edit requests and their tokenised prompt rows.

Every prompt is split at the subject's last token: the *prefix* (tokens before it) is
never affected by an edit at that token, the *suffix* (that token onwards) is. The value
optimiser computes the prefix once and recomputes only the suffix each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # template with "{}" where the subject goes
    subject: str  # the entity whose fact changes
    target: str  # new object, without a leading space

    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


@dataclass
class PromptRow:
    request: int  # index of the edit in its batch
    prefix: list[int]  # token ids before the subject's last token
    suffix: list[int]  # the subject's last token onwards (and the target minus its last token)
    target_cols: list[int] = field(default_factory=list)  # suffix indices whose logits predict target_ids
    target_ids: list[int] = field(default_factory=list)  # the target tokens
    is_kl: bool = False  # the "{subject} is a" row of the KL term
    context: int = -1  # index of the shared context whose ids begin `prefix` (-1: none)


def split_at_subject(tok, template: str, subject: str) -> tuple[list[int], list[int]]:
    """Token ids through the subject's last token, and the ids after it."""
    at = template.index("{}")
    head = template[:at] + subject
    tail = template[at + 2 :]
    a = tok(head)["input_ids"]
    b = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
    return a, b


def in_context(context_template: str, prompt: str) -> str:
    """Place a request prompt (with its "{}") into a "{prefix}. {}" context template."""
    return context_template.replace("{}", prompt, 1)


def context_ids(tok, templates: list[str]) -> list[list[int]]:
    """Token ids of each context template's text before its "{}" (trailing space dropped)."""
    return [tok(t[: t.index("{}")].rstrip())["input_ids"] for t in templates]


def value_rows(tok, requests: list[EditRequest], templates: list[str]) -> list[PromptRow]:
    """Rows of the value optimisation: each edit's prompt in every template, then its KL row.

    A row in template j whose prefix begins with `context_ids(tok, templates)[j]` is marked
    `context=j`, so that the context's keys/values can be computed once for the whole chunk.
    """
    rows: list[PromptRow] = []
    shared = context_ids(tok, templates)
    for i, req in enumerate(requests):
        target = tok(" " + req.target, add_special_tokens=False)["input_ids"]
        for j, ctx in enumerate(["{}", *templates], start=-1):
            head, tail = split_at_subject(tok, in_context(ctx, req.prompt), req.subject)
            suffix = [head[-1], *tail, *target[:-1]]
            cols = [len(tail) + k for k in range(len(target))]
            ctx_j = j if j >= 0 and 0 < len(shared[j]) < len(head) and head[: len(shared[j])] == shared[j] else -1
            rows.append(PromptRow(i, head[:-1], suffix, cols, target, context=ctx_j))
        head, tail = split_at_subject(tok, "{} is a", req.subject)
        rows.append(PromptRow(i, head[:-1], [head[-1], *tail], is_kl=True))
    return rows


def key_rows(tok, requests: list[EditRequest], templates: list[str]) -> list[list[int]]:
    """Per edit and template (plain prompt first), token ids up to and including the subject."""
    return [split_at_subject(tok, in_context(ctx, r.prompt), r.subject)[0] for r in requests for ctx in ["{}", *templates]]
