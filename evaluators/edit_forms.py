"""What an edit is trained on besides its own prompt: its other forms and the subject's other facts.

An edit must answer in the forms users ask (the relation's other phrasings, a question, the model's chat template,
the subject in lower case, the record's paraphrases and aliases) and must leave the subject's other facts as the
unedited model states them. `enrich` draws both from the relation bank (evaluators/relations.py) by the edit's
relation and its subject's kind: the *train* templates only, so that the measure (evaluators/specificity.py),
which asks the *test* templates, sees prompts the optimiser never saw. An edit whose template is not in the bank
(a user's own relation) still gets the chat and lower-case forms of its own prompt, and the subject's description
prompts of no kind ("{} is").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from editors.prompts import EditRequest
from evaluators.relations import QUESTION_FORMAT, RelationBank, fill


@dataclass(frozen=True)
class FormSettings:
    """Which forms and preservation prompts an edit is optimised on (the value optimiser's rows)."""

    phrasings: int = 1  # other train templates of the edited relation that must answer the target
    question: bool = True  # the relation's question ("Question: ...\nAnswer:") must answer the target
    chat: bool = True  # the question through the model's chat template must answer the target
    lower: bool = True  # the edit prompt with the subject in lower case must answer the target
    paraphrases: int = 2  # the record's own paraphrases (first N) that must answer the target
    aliases: int = 2  # the record's aliases (first N), in the edit prompt, that must answer the target
    cues: int = 8  # further train templates of the edited relation that fire an answer-site slot (keys, not rows)
    keep_per_relation: int = 1  # train templates of each of the subject's other relations held in place
    keep_descriptions: int = 2  # description templates of the subject's kind held in place


GENERIC_DESCRIPTIONS = ("{} is", "{} is known for")  # preservation prompts for a subject of no known kind


def chat_template(tok, question: str) -> str | None:
    """`question` (with its "{}") as a user turn in the model's chat template, with the generation prompt; None
    for a tokenizer without one."""
    if not getattr(tok, "chat_template", None):
        return None
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return text if text.count("{}") == 1 else None


def enrich(request: EditRequest, bank: RelationBank, tok, settings: FormSettings = FormSettings(),
           relation_id: str | None = None, paraphrases: Sequence[str] = (), aliases: Sequence[str] = ()) -> EditRequest:
    """`request` with its training forms and keep prompts (see the module docstring)."""
    subject, template = request.subject, request.prompt
    relation = bank.relations.get(relation_id) if relation_id else bank.resolve(template, None)
    forms: list[tuple[str, str]] = []
    cues: list[tuple[str, str]] = []
    if relation is not None:
        others = [t for t in relation.templates("train") if t.strip() != template.strip()]
        forms += [(t, subject) for t in others[: settings.phrasings]]
        cues += [(t, subject) for t in others[settings.phrasings: settings.phrasings + settings.cues]]
    question = relation.question if relation is not None else None
    if settings.question and question:
        forms.append((QUESTION_FORMAT.format(question=question), subject))
    if settings.chat:
        chat = chat_template(tok, question or template)
        if chat is not None:
            forms.append((chat, subject))
    if settings.lower and subject.lower() != subject:
        forms.append((template, subject.lower()))
    forms += [(_as_template(p, subject), subject) for p in paraphrases[: settings.paraphrases] if subject in p]
    forms += [(template, a) for a in aliases[: settings.aliases]]
    keep = _keep(bank, relation.id if relation is not None else None, settings)
    return replace(request, forms=tuple(dict.fromkeys(forms)), keep=tuple(dict.fromkeys(keep)),
                   aliases=tuple(aliases), cues=tuple(cues))


def _as_template(prompt: str, subject: str) -> str:
    return prompt.replace("{", "(").replace("}", ")").replace(subject, "{}", 1)


def _keep(bank: RelationBank, relation_id: str | None, settings: FormSettings) -> list[str]:
    """Templates about the subject's other relations and its descriptions (train split)."""
    if relation_id is None:
        return list(GENERIC_DESCRIPTIONS[: settings.keep_descriptions])
    statements = bank.statements("{}", relation_id, "train", per_relation=settings.keep_per_relation,
                                 descriptions=False)
    kind = bank.kinds[bank.relation(relation_id).kind]
    return [s.template for s in statements] + list(kind.descriptions["train"][: settings.keep_descriptions])


def question_prompt(bank: RelationBank, relation_id: str, subject: str) -> str:
    """The relation's question about `subject` in the bank's question format."""
    return QUESTION_FORMAT.format(question=fill(bank.relation(relation_id).question, subject))


@dataclass
class EditForms:
    """The bank, tokenizer and settings an agent turns its facts into enriched edit requests with."""

    bank: RelationBank  # relations, kinds and their templates
    tok: object  # the edited model's tokenizer (for its chat template)
    settings: FormSettings = FormSettings()  # which forms and preservation prompts

    def request(self, record) -> EditRequest:
        """The edit request of a fact record (memory.record.FactRecord) with its forms and keep prompts."""
        relation = self.bank.resolve(record.template, record.old_target)
        return enrich(record.to_request(), self.bank, self.tok, self.settings,
                      relation.id if relation is not None else None, record.paraphrase_texts(), record.aliases)
