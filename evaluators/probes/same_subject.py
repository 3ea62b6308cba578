"""The guard's same-subject check: an edit must leave its subject's other answers as they were.

Before a batch is applied, every edited subject's other statements (the relation bank's first `PER_RELATION` *train*
templates of each other relation of its kind, and its descriptions: evaluators/relations.py) are answered greedily by
the model as it is (entity memory off); after the batch is applied and verified they are answered again. A fact
whose subject keeps fewer than `specificity_floor` of the statements the unedited model is sure of (first answer token
at p >= .3; all statements when it is sure of none) is optimised again with a stronger hold on them (`keep_factor` x4
per try for subject-site slots; for answer-site slots a radius halfway closer to its keys), up to `max_tries`
optimisations; one that still changes them is `failed`, its reason quoting the changed answers, and in the entity
memory its slot is dropped (the fact is not answered, and nothing else about its subject changes).
The measure asks the bank's *test* templates instead (evaluators/specificity.py), so the guard never tunes on them.
`session` below is the agent's session (agent/session.py): these read its `forms`, `model`, `tok` and `editor.memory`.
"""
from __future__ import annotations

from dataclasses import dataclass

from evaluators.specificity import Answer, Probe, answer_key, generate_answers
from memory.record import StoredFact

SUBJECT_PROBE = "subject"  # probes-table kind: a statement about an edited subject the unedited model is sure of
UNSURE_PROBE = "subject-unsure"  # the same, for a statement it is not sure of
SURE_P = 0.3  # a statement is one the unedited model is sure of when its first answer token has this probability
ANSWER_TOKENS = 6  # new tokens compared per statement
PER_RELATION = 2  # train templates asked per other relation (all of them: 26 statements per fact on CounterFact
#   train 6,200-6,295, 2 per relation: 12.5, a test template per relation in the measure, evaluators/specificity.py)
ASK_BATCH = 128  # statements answered together (32 -> 128: 695 statements in 22 s instead of 32 s on 2 cores)


@dataclass
class SubjectReading:
    """One fact's subject statements, answered before and after its batch."""

    prompts: list[str]  # the statements asked (subject written in)
    before: list[Answer]  # the model before the batch, memory off
    after: list[Answer] | None = None  # the model with the batch applied

    def changed(self) -> list[tuple[str, str, str]]:
        """(prompt, before, after) of the statements that count and changed (sure ones; all when none is sure)."""
        assert self.after is not None
        rows = list(zip(self.prompts, self.before, self.after))
        sure = [r for r in rows if r[1].first_p >= SURE_P] or rows
        return [(p, b.text, a.text) for p, b, a in sure if answer_key(b.text) != answer_key(a.text)]

    def kept(self) -> float:
        """Share of the statements that count whose answer is unchanged (1.0 with none)."""
        assert self.after is not None
        rows = list(zip(self.before, self.after))
        sure = [r for r in rows if r[0].first_p >= SURE_P] or rows
        return 1.0 if not sure else 1 - len(self.changed()) / len(sure)


def statements(session, fact: StoredFact) -> list[str]:
    """The subject's other statements the guard asks (none for a relation the bank does not know)."""
    forms = session.forms
    if forms is None:
        return []
    relation = forms.bank.resolve(fact.record.template, fact.record.old_target)
    if relation is None:
        return []
    others = [r.id for r in forms.bank.candidates(fact.record.template) if r.id != relation.id]
    asked = fact.record.text.strip()  # the edit's own prompt (e.g. "X is a" -> bishop) is what changes, not another
    return [s.prompt for s in forms.bank.statements(fact.record.subject, relation.id, "train", PER_RELATION, others)
            if s.prompt.strip() != asked]


def ask(session, prompts: list[str], state_layer: int | None = None) -> list[Answer]:
    probes = [Probe(p, ANSWER_TOKENS) for p in prompts]
    return generate_answers(session.model, session.tok, probes, ASK_BATCH, state_layer) if prompts else []


def read_before(session, facts: list[StoredFact]) -> dict[int, SubjectReading]:
    """Per fact, its subject's statements answered by the model before the batch (entity memory off), each with the
    memory layer's state at its last token (what decides whether a slot fires on it)."""
    asked = {f.id: statements(session, f) for f in facts}
    flat = [p for ps in asked.values() for p in ps]
    with session.editor.memory.suspended():
        answers = ask(session, flat, session.editor.memory.layer)
    out, at = {}, 0
    for fid, ps in asked.items():
        out[fid] = SubjectReading(ps, answers[at: at + len(ps)])
        at += len(ps)
    return out


def read_after(session, readings: dict[int, SubjectReading], ids: list[int], weights_moved: bool = True) -> None:
    """Fill `after` of the readings of `ids` with the model as it is now. When the batch moved no weight
    (`weights_moved` False: entity-memory slots only), a statement on which no slot fires is answered exactly as
    before the batch, so only the statements where one fires are asked again."""
    prompts = [(fid, i, p) for fid in ids for i, p in enumerate(readings[fid].prompts)]
    memory = session.editor.memory
    if not weights_moved:
        tok = session.tok
        prompts = [(fid, i, p) for fid, i, p in prompts
                   if readings[fid].before[i].state is None
                   or memory.fires(tok(p).input_ids, readings[fid].before[i].state, readings[fid].before[i].token)]
    answers = dict(zip([(fid, i) for fid, i, _ in prompts], ask(session, [p for _, _, p in prompts])))
    for fid in ids:
        r = readings[fid]
        r.after = [answers.get((fid, i), b) for i, b in enumerate(r.before)]


def below_floor(readings: dict[int, SubjectReading], facts: list[StoredFact], floor: float) -> list[StoredFact]:
    return [f for f in facts if readings[f.id].prompts and readings[f.id].kept() < floor]


def reason(reading: SubjectReading) -> str:
    """The failed fact's reason: how much of its subject it changed, quoting up to three changed answers."""
    quoted = "; ".join(f"{p!r}: {b.strip()!r} -> {a.strip()!r}" for p, b, a in reading.changed()[:3])
    return f"changed its subject's other answers (kept {reading.kept():.0%}): {quoted}"


def probe_rows(facts: list[StoredFact], readings: dict[int, SubjectReading]) -> list[dict]:
    """The probes-table rows of the check (expected: the answer before the batch; output: after it)."""
    return [{"fact_id": f.id, "kind": SUBJECT_PROBE if b.first_p >= SURE_P else UNSURE_PROBE, "prompt": p,
             "expected": b.text, "output": a.text, "correct": answer_key(b.text) == answer_key(a.text)}
            for f in facts for p, b, a in zip(readings[f.id].prompts, readings[f.id].before,
                                               readings[f.id].after or [])]


def stored_probes(probes: list[dict], fact_id: int) -> list[dict]:
    """The fact's same-subject rows of its latest check (a fact retried in a later batch: that batch's)."""
    rows = [p for p in probes if p["fact_id"] == fact_id and p["kind"] in (SUBJECT_PROBE, UNSURE_PROBE)]
    last = max((p["batch_id"] or 0 for p in rows), default=None)
    return [p for p in rows if (p["batch_id"] or 0) == last]


def counted(rows: list[dict]) -> list[dict]:
    """The stored statements that count: those the unedited model is sure of (all of them when it is sure of none)."""
    return [r for r in rows if r["kind"] == SUBJECT_PROBE] or rows


def kept_now(rows: list[dict], answers: list[str]) -> float | None:
    """Share of the stored statements (sure ones; all when none is sure) whose answer `answers` still equals the
    answer before the edit; None without statements."""
    pairs = list(zip(rows, answers))
    counted = [(r, a) for r, a in pairs if r["kind"] == SUBJECT_PROBE] or pairs
    if not counted:
        return None
    return sum(answer_key(r["expected"]) == answer_key(a) for r, a in counted) / len(counted)


def kept_by_fact(model, tok, facts: list[StoredFact], probes: list[dict]) -> dict[int, tuple[float | None, float | None]]:
    """Per fact, (kept at its check, kept by `model` as it is now): the share of its subject's stored statements (its
    latest check's) whose answer is the unedited model's, as the check found it and as `model` answers them now
    (None, None where the check stored none)."""
    stored = {f.id: counted(stored_probes(probes, f.id)) for f in facts}
    flat = [r["prompt"] for rows in stored.values() for r in rows]
    answers = [a.text for a in generate_answers(model, tok, [Probe(p, ANSWER_TOKENS) for p in flat])] if flat else []
    out, at = {}, 0
    for fid, rows in stored.items():
        out[fid] = (kept_now(rows, [r["output"] for r in rows]), kept_now(rows, answers[at: at + len(rows)]))
        at += len(rows)
    return out

