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
    forms: tuple[tuple[str, str], ...] = ()  # other (template, subject text) pairs that must answer the target:
    #   paraphrases, a question, the chat template, the subject in lower case or an alias
    keep: tuple[str, ...] = ()  # templates about the same subject whose next-token distribution must not move
    #   (its other relations and its description): the KL rows that hold the subject's other facts in place
    aliases: tuple[str, ...] = ()  # other names of the subject: the entity memory fires its slot on them too
    cues: tuple[tuple[str, str], ...] = ()  # more (template, subject text) pairs that must fire an answer-site slot
    #   (the relation's other phrasings): keys only, no optimiser rows, so they cost one forward each

    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def key(self) -> tuple:
        """Everything the request's target value depends on (values are cached by it)."""
        return self.prompt, self.subject, self.target, self.forms, self.keep, self.aliases  # cues: keys only


@dataclass
class PromptRow:
    request: int  # index of the edit in its batch
    prefix: list[int]  # token ids before the subject's last token
    suffix: list[int]  # the subject's last token onwards (and the target minus its last token)
    target_cols: list[int] = field(default_factory=list)  # suffix indices whose logits predict target_ids
    target_ids: list[int] = field(default_factory=list)  # the target tokens
    is_kl: bool = False  # a KL row: "{subject} is a" or one of the request's `keep` templates
    context: int = -1  # index of the shared context whose ids begin `prefix` (-1: none)
    kl_weight: float = 0.0  # the KL row's weight in its request's loss


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


def split_at_answer(tok, template: str, subject: str) -> tuple[list[int], list[int]]:
    """The whole prompt's token ids and nothing after them: the delta goes on the prompt's last token."""
    return tok(template.replace("{}", subject, 1))["input_ids"], []


def _target_row(tok, i: int, template: str, subject: str, target: list[int], context: int = -1,
                split=split_at_subject) -> PromptRow:
    head, tail = split(tok, template, subject)
    cols = [len(tail) + k for k in range(len(target))]
    return PromptRow(i, head[:-1], [head[-1], *tail, *target[:-1]], cols, target, context=context)


def _kl_row(tok, i: int, template: str, subject: str, weight: float) -> PromptRow:
    head, tail = split_at_subject(tok, template, subject)
    return PromptRow(i, head[:-1], [head[-1], *tail], is_kl=True, kl_weight=weight)


def chat_prefix(tok) -> list[int]:
    """Token ids every prompt in the tokenizer's chat template begins with (its system prompt and the user turn's
    header), [] without a chat template: the chat forms' rows share them as a context computed once."""
    if not getattr(tok, "chat_template", None):
        return []
    a, b = (tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                        tokenize=False))["input_ids"] for c in ("A", "B"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def row_contexts(tok, templates: list[str]) -> list[list[int]]:
    """The token prefixes the value optimisation's rows may share: each context template's, then the chat
    template's (see `value_rows`)."""
    chat = chat_prefix(tok)
    return context_ids(tok, templates) + ([chat] if chat else [])


def _context_of(head: list[int], shared: list[list[int]], allowed) -> int:
    """The longest of the `allowed` shared prefixes that the row's prefix (`head` without its last token) begins
    with, or -1."""
    best = -1
    for j in allowed:
        c = shared[j]
        if 0 < len(c) < len(head) and head[: len(c)] == c and (best < 0 or len(c) > len(shared[best])):
            best = j
    return best


def answer_texts(request: EditRequest, templates: list[str]) -> list[str]:
    """The prompts of an answer-site edit's value rows, in their order: its prompt in every context (plain first),
    then its forms, subjects filled in (the texts whose last-token states are its slot's keys for them)."""
    return [*(in_context(c, request.prompt).replace("{}", request.subject, 1) for c in ["{}", *templates]),
            *(t.replace("{}", s, 1) for t, s in request.forms)]


def value_rows(tok, requests: list[EditRequest], templates: list[str], kl_factor: float = 1.0,
               keep_factor: float = 1.0, site: str = "subject") -> list[PromptRow]:
    """Rows of the value optimisation: each edit's prompt in every template, its other forms, then its KL rows
    ("{subject} is a" weighted `kl_factor`, the `keep` templates sharing `keep_factor`). With `site="answer"` the
    delta sits on each prompt's last token and there are no KL rows (the slot's key keeps it off other prompts).

    A row in template j whose prefix begins with `row_contexts(tok, templates)[j]` is marked `context=j`, and a form
    whose prefix begins with the chat template's shared prefix is marked with its index, so that each shared prefix's
    keys/values are computed once for the whole chunk (a chat prompt's system prompt is most of its tokens).
    """
    rows: list[PromptRow] = []
    shared = row_contexts(tok, templates)
    chat = range(len(templates), len(shared))
    for i, req in enumerate(requests):
        target = tok(" " + req.target, add_special_tokens=False)["input_ids"]
        split = split_at_answer if site == "answer" else split_at_subject
        for j, ctx in enumerate(["{}", *templates], start=-1):
            head = split(tok, in_context(ctx, req.prompt), req.subject)[0]
            ctx_j = _context_of(head, shared, [j] if j >= 0 else [])
            rows.append(_target_row(tok, i, in_context(ctx, req.prompt), req.subject, target, ctx_j, split))
        for template, subject in req.forms:
            ctx_f = _context_of(split(tok, template, subject)[0], shared, chat)
            rows.append(_target_row(tok, i, template, subject, target, ctx_f, split))
        if site == "answer":
            continue
        rows.append(_kl_row(tok, i, "{} is a", req.subject, kl_factor))
        rows += [_kl_row(tok, i, t, req.subject, keep_factor / len(req.keep)) for t in req.keep]
    return rows


def n_target_rows(requests: list[EditRequest], templates: list[str]) -> list[int]:
    """Per request, its rows that must answer the target (its NLL is their mean)."""
    return [1 + len(templates) + len(r.forms) for r in requests]


def key_rows(tok, requests: list[EditRequest], templates: list[str]) -> list[list[int]]:
    """Per edit and template (plain prompt first), token ids up to and including the subject."""
    return [split_at_subject(tok, in_context(ctx, r.prompt), r.subject)[0] for r in requests for ctx in ["{}", *templates]]
