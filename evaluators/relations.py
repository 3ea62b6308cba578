"""The relation template bank: CounterFact's prompt templates by relation, and prompts about one subject.

The bank (`evaluators/data/relations.json`, built by `scripts/build_relation_bank.py` from CounterFact's templates;
see `evaluators/data/ATTRIBUTION.md`) holds 33 Wikidata relations, each with its subject kind, a hand-written
question and its statement templates split into "train" (the value optimiser may use them) and "test" (only the
measure, `evaluators/specificity.py`, asks them), and 8 subject kinds, each with the relations asked about its
subjects and description templates ("{} is a", split the same way). A template several relations share ("{}, the")
belongs to no single relation: `resolve` picks one by the answer, and none of them is used as a statement.

Split of the data: tuning happens on counterfact-train (the value optimiser's settings on records 0-999); final
figures are reported on counterfact-val.json, which nobody tunes on.

Prompt forms of one edit (`RelationBank.forms`): "edit" (the record's prompt), "paraphrase" (the record's
paraphrases: "paraphrase", "paraphrase#2", ...), "phrasing" (the relation's first *test* template other than the
edit's: a phrasing no edit is trained or keyed on, unlike a record's paraphrase, which may use a train template),
"question" (`QUESTION_FORMAT`, e.g. "Q: What is the capital of
France?\\nA:"; SmolLM2-Instruct answers "Question: ...\\nAnswer:" and "Question: ... Answer:" with end-of-text
at once for 4 of 6 questions tried, "Q: ...\\nA:" in a sentence), "chat" (that question through the model's own
chat template, with the generation prompt), "lower" (the edit prompt with the subject lower-cased, when that
differs) and "alias" ("alias", "alias#2", ... for the record's aliases). `form_name("paraphrase#2") == "paraphrase"`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

BANK_FILE = "relations.json"
SPLITS = ("train", "test")
DESCRIPTION = "description"  # Statement.relation of a description prompt ("{} is a")
QUESTION_FORMAT = "Q: {question}\nA:"  # the "question" form; the answer is generated after "A:"


def fill(template: str, subject: str) -> str:
    """The template with its "{}" replaced by the subject."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    return template.replace("{}", subject, 1)


def form_name(key: str) -> str:
    """The form a `forms` key belongs to ("paraphrase#2" -> "paraphrase")."""
    return key.split("#", 1)[0]


@dataclass(frozen=True)
class Relation:
    id: str  # Wikidata property id, e.g. "P36"
    name: str  # short name, e.g. "capital"
    kind: str  # the kind of its subjects, e.g. "country"
    question: str  # question template, e.g. "What is the capital of {}?"
    train: tuple[str, ...]  # statement templates the value optimiser may use (most used first)
    test: tuple[str, ...]  # statement templates only the measure asks (at least one; most used first)

    def templates(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        return self.train if split == "train" else self.test


@dataclass(frozen=True)
class Kind:
    name: str  # e.g. "person"
    relations: tuple[str, ...]  # relation ids asked about subjects of this kind
    descriptions: dict[str, tuple[str, ...]]  # split -> description templates ("{} is a", ...)


@dataclass(frozen=True)
class Statement:
    prompt: str  # the template with the subject written in
    relation: str  # relation id, or DESCRIPTION
    template: str  # the template it was filled from


@dataclass(frozen=True)
class RelationBank:
    relations: dict[str, Relation]  # id -> relation
    kinds: dict[str, Kind]  # name -> kind
    templates: dict[str, tuple[str, ...]] = field(default_factory=dict)  # every CounterFact template -> relation ids
    answer_votes: dict[str, dict[str, int]] = field(default_factory=dict)  # relation -> answer -> count (train)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RelationBank":
        """The shipped bank, or the JSON file at `path` (the same layout)."""
        source = Path(path) if path else files("evaluators") / "data" / BANK_FILE
        raw = json.loads(source.read_text(encoding="utf-8"))
        relations = {r["id"]: Relation(r["id"], r["name"], r["kind"], r["question"], tuple(r["train"]),
                                       tuple(r["test"])) for r in raw["relations"]}
        kinds = {k["name"]: Kind(k["name"], tuple(k["relations"]),
                                 {s: tuple(k["descriptions"][s]) for s in SPLITS}) for k in raw["kinds"]}
        templates = {t["template"]: tuple(t["relations"]) for t in raw["templates"]}
        return cls(relations, kinds, templates, raw.get("answer_votes", {}))

    def relation(self, relation_id: str) -> Relation:
        try:
            return self.relations[relation_id]
        except KeyError:
            raise KeyError(f"relation {relation_id!r} is not in the bank") from None

    def candidates(self, template: str) -> list[Relation]:
        """Every relation the template may ask (one for most; several for a shared one; none for an unknown one)."""
        return [self.relations[r] for r in self.templates.get(template.strip(), ())]

    def relation_of(self, template: str) -> Relation | None:
        """The template's relation; None for an unknown template or one several relations share (see `resolve`)."""
        found = self.candidates(template)
        return found[0] if len(found) == 1 else None

    def resolve(self, template: str, answer: str | None = None) -> Relation | None:
        """The relation of an edit: the template's own, or for a shared template the candidate whose unambiguous
        templates have `answer` as ground truth most often on counterfact-train (ties and unseen answers: the
        first candidate, the commonest reading)."""
        found = self.candidates(template)
        if len(found) <= 1:
            return found[0] if found else None
        votes = [self.answer_votes.get(r.id, {}).get(answer or "", 0) for r in found]
        return found[votes.index(max(votes))]

    def kind_of(self, relation_or_template: str) -> Kind | None:
        """The subject kind of a relation id, or of a template (via `relation_of`); None when unknown."""
        rel = self.relations.get(relation_or_template) or self.relation_of(relation_or_template)
        return self.kinds[rel.kind] if rel else None

    def statements(self, subject: str, relation_id: str, split: str = "test", per_relation: int | None = None,
                   exclude: Sequence[str] = (), descriptions: bool = True) -> list[Statement]:
        """Prompts about `subject` for every relation of its kind other than `relation_id` (and those in
        `exclude`, e.g. the other candidates of a shared template), then its descriptions; the first
        `per_relation` templates of each (None: all of the split)."""
        kind = self.kinds[self.relation(relation_id).kind]
        skip = {relation_id, *exclude}
        out = []
        for rid in kind.relations:
            if rid not in skip:
                out += [Statement(fill(t, subject), rid, t) for t in self.relation(rid).templates(split)[:per_relation]]
        if descriptions:
            out += [Statement(fill(t, subject), DESCRIPTION, t) for t in kind.descriptions[split][:per_relation]]
        return out

    def question(self, subject: str, relation_id: str) -> str:
        """The relation's question about `subject` in `QUESTION_FORMAT`."""
        return QUESTION_FORMAT.format(question=fill(self.relation(relation_id).question, subject))

    def forms(self, subject: str, template: str, relation_id: str | None, paraphrases: Sequence[str] = (), tok=None,
              aliases: Sequence[str] = ()) -> dict[str, str]:
        """Prompt text per form of one edit (see the module docstring); "question" and "chat" need a relation,
        "chat" a tokenizer with a chat template."""
        out = {"edit": fill(template, subject)}
        out |= _numbered("paraphrase", paraphrases)
        if relation_id is not None:
            held_out = [t for t in self.relation(relation_id).templates("test") if t.strip() != template.strip()]
            if held_out:
                out["phrasing"] = fill(held_out[0], subject)
            out["question"] = self.question(subject, relation_id)
            if tok is not None and getattr(tok, "chat_template", None):
                question = fill(self.relation(relation_id).question, subject)
                out["chat"] = tok.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=False)
        if subject.lower() != subject:
            out["lower"] = fill(template, subject.lower())
        out |= _numbered("alias", [fill(template, a) for a in aliases])
        return out


def _numbered(name: str, prompts: Sequence[str]) -> dict[str, str]:
    return {(name if i == 0 else f"{name}#{i + 1}"): p for i, p in enumerate(prompts)}
