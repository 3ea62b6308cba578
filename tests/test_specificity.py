"""The relation bank (evaluators/relations.py, its build script) and the specificity / reach measure."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from evaluators.relations import DESCRIPTION, QUESTION_FORMAT, RelationBank, form_name
from evaluators.specificity import (Answer, EditCase, SpecificityConfig, answer_key, build_plan, contains,
                                    generate_answers, measure, Probe)
from tests.conftest import load_script, one_thread

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"


@pytest.fixture(scope="module")
def bank():
    return RelationBank.load()


def test_bank_is_whole(bank):
    assert len(bank.relations) >= 30 and len(bank.templates) >= 200
    for rel in bank.relations.values():
        assert rel.test and not set(rel.test) & set(rel.train), rel.id
        assert "{}" in rel.question and rel.kind in bank.kinds
        assert all(bank.relation_of(t) is rel for t in rel.train + rel.test)
    for kind in bank.kinds.values():
        assert all(r in bank.relations for r in kind.relations)
        assert kind.descriptions["test"] and not set(kind.descriptions["test"]) & set(kind.descriptions["train"])
    assert all(bank.candidates(t) for t in bank.templates)


def test_relation_lookup(bank):
    assert bank.relation_of("The capital of {} is").name == "capital"
    assert bank.kind_of("The mother tongue of {} is").name == "person"
    assert bank.relation_of("{}, the") is None  # shared by position played, instrument, sport
    assert bank.resolve("{}, the", "guitar").name == "instrument"
    assert bank.resolve("{}, the", "midfielder").name == "position played"
    assert bank.resolve("{} is located in", "Antarctica").name == "continent"
    assert bank.relation_of("{} is a nonsense template") is None and bank.kind_of("nope") is None


def test_statements_skip_the_edited_relation(bank):
    stmts = bank.statements("Danielle Darrieux", "P103", per_relation=1)
    rels = [s.relation for s in stmts]
    person = bank.kinds["person"]
    assert "P103" not in rels and set(rels) == (set(person.relations) - {"P103"}) | {DESCRIPTION}
    assert all("Danielle Darrieux" in s.prompt and "{}" not in s.prompt for s in stmts)
    assert {s.template for s in stmts if s.relation != DESCRIPTION} <= {t for r in bank.relations.values()
                                                                       for t in r.test}
    train = bank.statements("Danielle Darrieux", "P103", split="train", exclude=["P19"])
    assert "P19" not in {s.relation for s in train} and not {s.template for s in train} & {s.template for s in stmts}


def test_forms(bank, tok):
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    forms = bank.forms("France", "The capital of {} is", "P36", ["Paris is the capital of", "Its capital:"], tok,
                       ["the French Republic"])
    assert forms["edit"] == "The capital of France is" and forms["lower"] == "The capital of france is"
    assert forms["paraphrase#2"] == "Its capital:" and form_name("paraphrase#2") == "paraphrase"
    assert forms["question"] == QUESTION_FORMAT.format(question="What is the capital of France?")
    assert forms["chat"] == "<What is the capital of France?>A:"
    assert forms["alias"] == "The capital of the French Republic is"
    held_out = forms["phrasing"].replace("France", "{}", 1)  # a phrasing no edit trains or keys on
    assert held_out in bank.relation("P36").templates("test") and held_out not in bank.relation("P36").templates("train")
    assert set(bank.forms("paris", "{} is in", None)) == {"edit"}  # no relation: no question; lower case: no "lower"


def test_build_script_fails_on_an_unmapped_template(tmp_path):
    build = load_script("build_relation_bank")
    rec = {"prompt": "Xyz quux blorp Danielle", "subject": "Danielle", "ground_truth": "a"}
    for name in ("counterfact-train.json", "counterfact-val.json"):
        (tmp_path / name).write_text(json.dumps([rec]))
    with pytest.raises(SystemExit, match="unmapped templates"):
        build.build(tmp_path)
    assert build.relation_of("The capital of {} is") == ["P36"]


@pytest.mark.skipif(not DATA.exists(), reason="shared CounterFact data not present")
def test_shipped_bank_is_what_the_script_builds():
    build = load_script("build_relation_bank")
    shipped = json.loads((Path(__file__).resolve().parents[1] / "evaluators" / "data" / "relations.json").read_text())
    assert build.build(DATA) == shipped


def test_answer_key_and_contains():
    assert answer_key(" Paris, France") == answer_key(" paris.") == "paris"
    assert answer_key(" the Euro") != answer_key(" the Dollar")
    assert answer_key(" New York City is") == "new york city" != answer_key(" New Jersey")
    assert answer_key(' "Lionel 201') == "lionel" and answer_key(" ...") == ""
    assert contains(" It is in New York.", "new york") and not contains(" Parisian", "Paris")
    assert contains("Paris", "Paris") and not contains("anything", "")


class FakeModel:
    """Answers from a table per state; `edited()` switches to the edited table. Unknown prompts: ' unknown'."""

    def __init__(self, before: dict[str, str], after: dict[str, str], p: float = 0.9):
        self.tables, self.state, self.p = {"before": before, "after": before | after}, "before", p
        self.p_of: dict[str, float] = {}

    @contextlib.contextmanager
    def edited(self):
        self.state = "after"
        try:
            yield
        finally:
            self.state = "before"

    def generate(self, probes):
        table = self.tables[self.state]
        return [Answer(table.get(p.prompt, " unknown"), self.p_of.get(p.prompt, self.p)) for p in probes]


CASE = EditCase("Danielle Darrieux", "The mother tongue of {} is", "English", "French", None,
                ("Danielle Darrieux spoke the language of",), (),
                (("The mother tongue of Jean Gabin is", "French"),))


def _measure(fake, cases=(CASE,), **cfg):
    return measure(None, None, list(cases), contextlib.nullcontext, fake.edited, cfg=SpecificityConfig(**cfg),
                   generate=fake.generate)


def test_unchanged_model_keeps_everything():
    fake = FakeModel({"The mother tongue of Danielle Darrieux is": " French"}, {})
    res = _measure(fake)
    assert res.specificity_all == res.specificity_sure == res.neighbours_unchanged == 1.0
    assert res.native["edit"] == 1.0 and res.reach["edit"] == 0.0 and res.ratio["edit"] == 0.0
    assert res.n_statements == len(res.facts[0].statements) > 5


def test_one_changed_statement_lowers_specificity_by_its_share(bank):
    plan = build_plan(bank, [CASE], None, SpecificityConfig())
    stmts = plan.statements[0]
    fake = FakeModel({s.prompt: " Paris" for s in stmts}, {stmts[0].prompt: " Rome"})
    res = _measure(fake)
    assert res.specificity_all == pytest.approx(1 - 1 / len(stmts))
    changed = [s for s in res.facts[0].statements if not s.same]
    assert [(s.prompt, s.before, s.after) for s in changed] == [(stmts[0].prompt, " Paris", " Rome")]
    fake.p_of = {s.prompt: 0.1 for s in stmts[1:3]}  # two statements the unedited model is unsure of
    res = _measure(fake)
    assert res.n_sure == len(stmts) - 2 and res.specificity_sure == pytest.approx(1 - 1 / (len(stmts) - 2))


def test_reach_and_native_per_form():
    before = {"The mother tongue of Danielle Darrieux is": " French", "The mother tongue of danielle darrieux is":
              " French", "Danielle Darrieux spoke the language of": " Spanish"}
    after = {"The mother tongue of Danielle Darrieux is": " English.", "Danielle Darrieux spoke the language of":
             " english", "The mother tongue of Jean Gabin is": " English"}
    res = _measure(FakeModel(before, after))
    assert res.reach == {"edit": 1.0, "paraphrase": 1.0, "phrasing": 0.0, "question": 0.0, "lower": 0.0}
    assert res.native == {"edit": 1.0, "paraphrase": 0.0, "phrasing": 0.0, "question": 0.0, "lower": 1.0}
    assert res.ratio["edit"] == 1.0 and res.ratio["paraphrase"] is None
    assert res.neighbours_unchanged == 0.0
    assert res.summary()["reach_edit"] == 1.0


def test_real_generate_left_padding_matches_one_by_one(tok):
    with one_thread():
        from tests.conftest import make_tiny_llama

        model = make_tiny_llama(len(tok))
        probes = [Probe("The capital of France is", 6), Probe("Rome", 6), Probe("Ab, cd ef gh ij", 6),
                  Probe("x", 3)]
        batched = generate_answers(model, tok, probes, batch_size=4)
        alone = [generate_answers(model, tok, [p])[0] for p in probes]
    assert [a.text for a in batched] == [a.text for a in alone]
    assert all(a.first_p == pytest.approx(b.first_p, abs=1e-4) for a, b in zip(batched, alone))
    assert all(0 < a.first_p <= 1 for a in batched)


def test_measure_on_a_tiny_model_sees_a_perturbation(tok):
    from tests.conftest import make_tiny_llama

    with one_thread():
        model = make_tiny_llama(len(tok))
        res_same = measure(model, tok, [CASE], contextlib.nullcontext, contextlib.nullcontext,
                           cfg=SpecificityConfig(short_tokens=4, long_tokens=4))

        @contextlib.contextmanager
        def scrambled():
            g = torch.Generator().manual_seed(0)
            noise = 5.0 * torch.randn(model.config.hidden_size, generator=g)
            handle = model.model.layers[1].register_forward_hook(lambda m, i, o: (o[0] + noise,) + tuple(o[1:])
                                                                  if isinstance(o, tuple) else o + noise)
            try:
                yield
            finally:
                handle.remove()

        res_diff = measure(model, tok, [CASE], contextlib.nullcontext, scrambled,
                           cfg=SpecificityConfig(short_tokens=4, long_tokens=4))
    assert res_same.specificity_all == 1.0 and res_same.neighbours_unchanged == 1.0
    assert res_diff.specificity_all < 1.0


def test_bench_rows_gain_specificity_and_reach_columns(tmp_path, tok):
    from evaluators.bench import COLUMNS, BenchConfig, MethodResult, _Task, table
    from tests.conftest import make_tiny_llama

    recs = [{"case_id": 900000 + i, "prompt": f"The mother tongue of Person {c} is", "subject": f"Person {c}",
             "target_new": "English", "ground_truth": "French", "rephrase_prompt": f"Person {c} spoke",
             "locality_prompt": "The mother tongue of Someone is", "locality_ground_truth": "French"}
            for i, c in enumerate("ABC")]
    (tmp_path / "cf.json").write_text(json.dumps(recs))
    task = _Task(BenchConfig(facts=tmp_path / "cf.json", n=3, specificity_n=2), None, tok)
    assert len(task.spec.cases) == 2
    with one_thread():
        model = make_tiny_llama(len(tok))
        before = task.ask_specificity(model, tok)
    same = task.specificity(before, before)
    assert same["specificity_all"] == 1.0 and same["neighbours_unchanged"] == 1.0 and "native_edit" in same
    changed = task.specificity(before, [Answer(" zzz", 1.0)] * len(before))
    assert changed["specificity_all"] < 1.0 and changed["reach_edit"] == 0.0
    row = MethodResult.model_construct(**{c: 0.0 for c in COLUMNS} | {"method": "m"} | same)
    header = table([row]).splitlines()[0].split()
    assert {"specificity_all", "reach_edit", "native_edit"} <= set(header) and "reach_chat" not in header
    assert _Task(BenchConfig(facts=tmp_path / "cf.json", n=3, specificity_n=0), None, tok).spec is None
