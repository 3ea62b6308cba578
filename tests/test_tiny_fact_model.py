"""The agent on a model that knows facts: the tiny trained Llama of tests/assets/tiny_fact_model
(scripts/train_tiny_fact_model.py), so verification asks a model that really answers - nothing here fakes
`agent.batch.answered`.

What it shows that tiny random models cannot: counterfactual edits through `kagent watch` are verified (`kagent check`
asks the model; a fact that does not take would end `failed` with the model's answer), other subjects' facts
keep their answers, the edited subjects' other relations do NOT (a strict xfail, issue 26), a fact whose value is never
optimised (max_steps = 0) does not take and ends `failed` with the model's actual answer, and an edit that damages
other facts is refused by the guard. The workspace uses the asset's own probe sets (facts of subjects no test edits)
and its training text for the covariance statistics (`--stats-corpus`).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import agent.session
from agent.cli import cli
from agent.workspace import Workspace
from conftest import TINY_FACT_MODEL, one_thread, poison, toy_agent
from evaluators.scoring import greedy_matches

pytestmark = pytest.mark.usefixtures("toy_embedder")  # the toy embedder and one KAGENT_HOME for every test

KNOWN = json.loads((TINY_FACT_MODEL / "facts.json").read_text())
RESERVED = set(KNOWN["reserved_subjects"])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def counterfactuals(n: int, seed: int = 0, relation: str | None = None) -> list[dict]:
    """`n` facts about distinct editable subjects, each with another object of its relation as the new target."""
    rng = random.Random(seed)
    facts = [f for f in KNOWN["facts"] if f["subject"] not in RESERVED and relation in (None, f["relation"])]
    out, seen = [], set()
    for f in rng.sample(facts, len(facts)):
        if f["subject"] in seen:
            continue
        seen.add(f["subject"])
        objects = [o for o in KNOWN["relations"][f["relation"]]["objects"] if o != f["target"]]
        out.append(f | {"new": rng.choice(objects)})
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} editable subjects")


def feed_of(path: Path, facts: list[dict]) -> Path:
    template = {r: v["templates"][0] for r, v in KNOWN["relations"].items()}
    path.write_text("".join(json.dumps({"subject": f["subject"], "prompt": template[f["relation"]],
                                        "target": f["new"], "old_target": f["target"],
                                        "paraphrases": f["paraphrases"]}) + "\n" for f in facts))
    return path


@pytest.fixture(scope="module")
def model_and_tok():
    return AutoModelForCausalLM.from_pretrained(TINY_FACT_MODEL).eval(), AutoTokenizer.from_pretrained(TINY_FACT_MODEL)


@pytest.fixture(scope="module")
def fresh_ws(tmp_path_factory, shared_home):
    """A workspace on the tiny fact model, initialised once per module; tests get copies."""
    root = tmp_path_factory.mktemp("fact-ws") / "ws"
    with toy_agent(shared_home):
        res = run("init", "--model", TINY_FACT_MODEL, "--stats-corpus", TINY_FACT_MODEL / "corpus.txt",
                  "--stats-tokens", "20000", "--workspace", root)
        assert res.exit_code == 0, res.output
        ws = Workspace.open(root)
        ws.save_config(ws.config().model_copy(update={
            "probe_file": str(TINY_FACT_MODEL / "known_facts.jsonl"), "damage_file": str(TINY_FACT_MODEL / "probe_facts.jsonl"),
            "probe_tokens": 256, "retention_sample": 16}))
        session = agent.session.open_session(ws)
        session.baseline()  # measured again on the asset's probe sets
        session.close()
    return root


@pytest.fixture
def ws(tmp_path, fresh_ws):
    return Path(shutil.copytree(fresh_ws, tmp_path / "ws"))


def set_config(ws: Path, **update) -> None:
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update=update))


def facts_with(ws: Path, status: str) -> list[dict]:
    return json.loads(run("facts", "--status", status, "--json", "--workspace", ws).output)


def test_the_model_answers_its_training_facts_and_the_answer_depends_on_the_subject(model_and_tok):
    model, tok = model_and_tok
    facts = KNOWN["facts"]
    with one_thread():
        hits = greedy_matches(model, tok, [f["prompt"] for f in facts], [f["target"] for f in facts])
        # the same prompts with each subject swapped for another subject whose object differs
        rng = random.Random(1)
        by_rel: dict[str, list[dict]] = {}
        for f in facts:
            by_rel.setdefault(f["relation"], []).append(f)
        swapped = [(f, rng.choice([g for g in by_rel[f["relation"]] if g["target"] != f["target"]])) for f in facts]
        other = greedy_matches(model, tok, [g["prompt"] for _, g in swapped], [f["target"] for f, _ in swapped])
    assert hits.float().mean() >= 0.95
    assert other.float().mean() <= 0.05  # another subject's prompt does not give this subject's answer


def test_subjects_tokenise_alike_at_the_start_after_a_space_and_inside_their_prompts(model_and_tok):
    """What the entity memory's subject matching needs (editors/entity_memory.py subject_variants)."""
    _, tok = model_and_tok
    ids = {s: tok(s, add_special_tokens=False).input_ids for s in KNOWN["subjects"]}
    assert all(len(i) == 1 and tok(" " + s, add_special_tokens=False).input_ids == i for s, i in ids.items())
    assert all(ids[f["subject"]][0] in tok(p).input_ids for f in KNOWN["facts"] for p in [f["prompt"], *f["paraphrases"]])


def answers(ws: Path, facts: list[dict]) -> torch.Tensor:
    """Which `facts` the workspace's edited model answers with their training target (memory attached)."""
    session = agent.session.open_session(Workspace.open(ws))
    try:
        return greedy_matches(session.model, session.tok, [f["prompt"] for f in facts], [f["target"] for f in facts])
    finally:
        session.close()


def watched(ws: Path, tmp_path: Path, edits: list[dict]) -> tuple[list[dict], list[dict]]:
    res = run("watch", feed_of(tmp_path / "feed.jsonl", edits), "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    return facts_with(ws, "applied"), facts_with(ws, "failed")


def lost_answers(ws: Path, model_and_tok, facts: list[dict]) -> list[str]:
    """Prompts of `facts` the unedited model answers and the workspace's edited model no longer does."""
    model, tok = model_and_tok
    before = greedy_matches(model, tok, [f["prompt"] for f in facts], [f["target"] for f in facts])
    return [f["prompt"] for f, x in zip(facts, before & ~answers(ws, facts)) if x]


def test_counterfactual_edits_are_verified_and_leave_other_subjects_alone(ws, tmp_path, model_and_tok):
    """Every fact ends applied (the model answers it: `check` agrees) or failed (with what the model says instead);
    facts of subjects nobody edited keep their answers."""
    edits = counterfactuals(8)
    applied, failed = watched(ws, tmp_path, edits)
    assert applied and len(applied) + len(failed) == 8
    check = run("check", "--json", "--workspace", ws)
    assert check.exit_code == 0, check.output
    assert [r["took"] for r in json.loads(check.stdout)] == [True] * len(applied)
    assert all("the model answers '" in f["reason"] for f in failed)
    edited = {e["subject"] for e in edits}
    others = random.Random(2).sample([f for f in KNOWN["facts"] if f["subject"] not in edited], 60)
    assert lost_answers(ws, model_and_tok, others) == []


@pytest.mark.xfail(strict=True, reason="on this model an edit still changes some of its subject's other answers "
                   "(same-subject specificity, issue 26): flips to a pass, and must then lose this mark, once it does not")
def test_an_edited_subjects_other_relations_keep_their_answers(ws, tmp_path, model_and_tok):
    edits = counterfactuals(8)
    watched(ws, tmp_path, edits)
    edited = {(e["subject"], e["relation"]) for e in edits}
    same_subject = [f for f in KNOWN["facts"] if f["subject"] in {s for s, _ in edited}
                    and (f["subject"], f["relation"]) not in edited]
    assert lost_answers(ws, model_and_tok, same_subject) == []


def test_an_edit_that_damages_other_facts_is_refused_by_the_guard(ws, tmp_path, model_and_tok, monkeypatch):
    """The guard's probes are facts the model really knows (the asset's reserved subjects): a weight update that
    breaks them is rolled back and its fact quarantined, and the model answers them as before. (The damage measure
    compares against random updates of the same size, so a random destructive update is the perplexity's and the
    known facts' to catch.)"""
    # the known-fact guard on (its default is off on SmolLM2, where a flip count over a few dozen facts is noise; here
    # every probe fact is one the model answers), perplexity out of the way: the reason must be the lost facts
    set_config(ws, interference_threshold=1e9, max_tries=1, known_acc_drop=0.05, ppl_ratio=1e6,
               editor={"write": "weights"})
    (edit,) = counterfactuals(1, seed=4)
    poison(monkeypatch, edit["subject"], size=5.0)
    res = run("watch", feed_of(tmp_path / "feed.jsonl", [edit]), "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    (quarantined,) = facts_with(ws, "quarantined")
    assert quarantined["reason"].startswith("probe: known-fact accuracy "), quarantined["reason"]
    assert quarantined["reason"].endswith("< baseline 1.000 - 0.05"), quarantined["reason"]
    probes = [f for f in KNOWN["facts"] if f["subject"] in RESERVED]
    assert bool(answers(ws, probes).all())


def test_a_fact_whose_value_is_never_optimised_fails_with_the_models_answer(ws, tmp_path):
    set_config(ws, editor={"max_steps": 0})  # the value never moves, however often it is retried
    (edit,) = counterfactuals(1, seed=3)
    res = run("watch", feed_of(tmp_path / "feed.jsonl", [edit]), "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert "0 applied" in res.output and "1 failed" in res.output
    (failed,) = facts_with(ws, "failed")
    assert f"the model answers '{edit['target']}" in failed["reason"] and "did not take after 3 tries" in failed["reason"]
    assert run("check", "--workspace", ws).output.strip().endswith("0 of 0 applied fact(s) answer their target")


def test_bench_known_only_keeps_the_records_whose_true_answer_the_model_gives(model_and_tok):
    from types import SimpleNamespace

    from evaluators.bench import known

    model, tok = model_and_tok
    facts = [json.loads(line) for line in (TINY_FACT_MODEL / "known_facts.jsonl").read_text().splitlines()[:6]]
    right = [SimpleNamespace(prompt=f["prompt"], ground_truth=f["target"]) for f in facts]
    wrong = [SimpleNamespace(prompt=f["prompt"], ground_truth="Zzyzx") for f in facts]
    mixed = [r for pair in zip(right, wrong) for r in pair]
    assert known(model, tok, mixed) == right


def test_bench_tiers_runs_the_products_path_and_reports_what_its_workspace_holds(tmp_path):
    """`kagent bench --tiers`: init, watch and consolidate in a new workspace; its figures are that workspace's (the
    tier of every applied fact as `kagent facts` lists it, every applied fact answering with both tiers), and a
    directory that already holds a workspace is refused before anything runs."""
    edits = counterfactuals(3, seed=5)
    template = {r: v["templates"][0] for r, v in KNOWN["relations"].items()}
    kept = next(f for f in KNOWN["facts"] if f["subject"] in RESERVED)
    records = [{"case_id": 900_000 + i, "prompt": template[e["relation"]].replace("{}", e["subject"]),
                "subject": e["subject"], "target_new": e["new"], "ground_truth": e["target"],
                "rephrase_prompt": e["paraphrases"][0], "locality_prompt": kept["prompt"],
                "locality_ground_truth": kept["target"]} for i, e in enumerate(edits)]
    facts = tmp_path / "cf.json"
    facts.write_text(json.dumps(records))
    root, out = tmp_path / "tiers-ws", tmp_path / "tiers.json"
    args = ["bench", "--tiers", root, "--facts", facts, "--n", 3, "--model", TINY_FACT_MODEL, "--stats-corpus",
            TINY_FACT_MODEL / "corpus.txt", "--set", "stats_tokens=20000", "--json", out]
    res = run(*args)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    listed = facts_with(root, "applied")
    assert got["lines"] == 3 and got["applied"] == len(listed) >= 1
    assert (got["memory_tier"], got["weights_tier"]) == (sum(f["tier"] == "memory" for f in listed),
                                                         sum(f["tier"] == "weights" for f in listed))
    assert got["answer_both_tiers"] == got["applied"]  # every applied fact answers, whichever tier holds it
    assert got["weights_tier"] <= got["answer_weights_alone"]
    assert got["watch_seconds"] > 0 and got["consolidation"]
    again = run(*args)
    assert again.exit_code != 0 and "already exists" in again.output
