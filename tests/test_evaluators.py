"""Evaluators: batched scoring against brute force, metric arithmetic, perplexity, norms, shipped data.

Fast tier runs on the tiny random models and the toy tokenizer from conftest; the slow tier
checks the shipped probe set and held-out perplexity on the embedded SmolLM2.
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from editors import corpus
from editors.arch import weight_view
from editors.prompts import EditRequest
from evaluators.counterfact import CounterFactRecord, evaluate_counterfact, harmonic_mean, result_from_nll, to_requests
from evaluators.monitors.norms import layer_norms, norm_growth, snapshot
from evaluators.probes import facts as probe_sets
from evaluators.probes.answers import known_fact_accuracy, retention
from evaluators.probes.damage import damage, fact_margins, layer_norms_of, random_update
from evaluators.probes.facts import (CF_TRAIN, CF_VAL, ZSRE, KnownFact, ProbeFact, load_known_facts, load_probe_facts,
                                     reserved)
from evaluators.probes.perplexity import perplexity, windows
from evaluators.scoring import greedy_matches, greedy_next_tokens, target_nll, top1_tokens_correct
from evaluators.zsre import ZsreRecord, evaluate_zsre, locality_predictions
from evaluators.zsre import to_requests as zsre_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PROMPTS = ["The capital of France is", "Paris is in", "A", "Who wrote Hamlet? It was written by"]
ANSWERS = ["Paris", "France and Europe", "b", "Shakespeare"]


def brute_nll(model, tok, prompt: str, answer: str) -> float:
    """Unbatched reference: full-sequence logits, mean NLL of the answer tokens."""
    p = tok(prompt).input_ids
    a = tok(" " + answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0].float()
    logp = logits.log_softmax(-1)[len(p) - 1: len(p) + len(a) - 1]
    return float(-logp[torch.arange(len(a)), torch.tensor(a)].mean())


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_target_nll_matches_brute_force(name, tok, request):
    model = request.getfixturevalue(name)
    got = target_nll(model, tok, PROMPTS, ANSWERS)
    want = torch.tensor([brute_nll(model, tok, p, a) for p, a in zip(PROMPTS, ANSWERS)])
    assert torch.allclose(got, want, atol=1e-4)


def test_batch_size_and_padding_do_not_change_scores(tiny_llama, tok):
    one = target_nll(tiny_llama, tok, PROMPTS, ANSWERS, batch_size=1)
    two = target_nll(tiny_llama, tok, PROMPTS, ANSWERS, batch_size=2)
    # the same pairs among longer ones (more padding) and in another order
    mixed = target_nll(tiny_llama, tok, ["x" * 60] + PROMPTS[::-1], ["y" * 30] + ANSWERS[::-1], batch_size=8)
    assert torch.allclose(one, two, atol=1e-5)
    assert torch.allclose(one, mixed[1:].flip(0), atol=1e-5)


@pytest.fixture
def varied_llama(tiny_llama, tok):
    """The tiny Llama with an independent random LM head: tied random embeddings make greedy
    decoding just repeat the last input token, which hides greedy/teacher-forcing mismatches."""
    torch.manual_seed(1)
    head = torch.nn.Linear(32, tiny_llama.config.vocab_size).requires_grad_(False)
    head.weight.mul_(20.0)
    head.bias.zero_()
    head.bias[tok.convert_tokens_to_ids(" ")] = 8.0  # make space-led answers common enough to find
    tiny_llama.lm_head = head
    return tiny_llama


def greedy_facts(model, tok, n: int = 4) -> tuple[list[str], list[str]]:
    """Prompts and answers the model itself gives greedily (" " + answer is its greedy continuation).

    Answers always start with the space token, so search random letter prompts for ones whose
    greedy next token is a space, then decode three more tokens.
    """
    gen = torch.Generator().manual_seed(0)
    letters = string.ascii_lowercase
    prompts = ["".join(letters[int(i)] for i in torch.randint(26, (6,), generator=gen)) for _ in range(300)]
    space = tok.convert_tokens_to_ids(" ")
    firsts = greedy_next_tokens(model, tok, prompts, n_tokens=1, batch_size=300)
    candidates = [p for p, f in zip(prompts, firsts) if f[0] == space]
    conts = greedy_next_tokens(model, tok, candidates, n_tokens=4)
    found = [(p, tok.decode(c)[1:]) for p, c in zip(candidates, conts) if all(t > 2 and t != space for t in c[1:])]
    assert len(found) >= n, "not enough space-led greedy continuations in the random prompts"
    return [p for p, _ in found[:n]], [a for _, a in found[:n]]


def test_greedy_matches_agree_with_greedy_decoding(varied_llama, tok):
    prompts, answers = greedy_facts(varied_llama, tok)
    assert greedy_matches(varied_llama, tok, prompts, answers).all()
    assert top1_tokens_correct(varied_llama, tok, prompts, answers).eq(1).all()
    wrong = [a[:2] + ("a" if a[2] != "a" else "b") for a in answers]  # right first tokens, wrong third
    assert greedy_matches(varied_llama, tok, prompts, wrong, first_token_only=True).all()
    assert not greedy_matches(varied_llama, tok, prompts, wrong).any()
    assert top1_tokens_correct(varied_llama, tok, prompts, wrong).lt(1).all()


def test_counterfact_metric_arithmetic():
    # rows: new/true on prompt, new/true on rephrase, new/locality-answer on locality prompt
    nll = torch.tensor([
        [1.0, 2.0, 3.0, 1.0],
        [2.0, 2.0, 1.0, 2.0],  # ES: new < true for records 0 and 3 (a tie is a miss)
        [1.0, 5.0, 5.0, 5.0],
        [2.0, 1.0, 1.0, 1.0],  # PS: record 0 only
        [3.0, 3.0, 1.0, 1.0],
        [1.0, 1.0, 2.0, 1.0],  # NS: locality answer < new for records 0 and 1
    ])
    res = result_from_nll(nll, [10, 11, 12, 13])
    assert res.es_hits == [True, False, False, True]
    assert res.ps_hits == [True, False, False, False]
    assert res.ns_hits == [True, True, False, False]
    assert (res.es, res.ps, res.ns) == (0.5, 0.25, 0.5)
    assert res.score == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 0.5))
    assert res.es_margin == [1.0, 0.0, -2.0, 1.0]
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0


def _record(case_id: int, prompt: str, subject: str, new: str, true: str) -> CounterFactRecord:
    return CounterFactRecord(case_id=case_id, prompt=prompt, subject=subject, target_new=new, ground_truth=true,
                             rephrase_prompt="In short, " + prompt, locality_prompt="Lyon is in",
                             locality_ground_truth=true)


def test_counterfact_evaluation_and_requests(tiny_llama, tok):
    records = [_record(1, "The capital of France is", "France", "Rome", "Paris"),
               _record(2, "Hamlet was written by", "Hamlet", "Dickens", "Shakespeare")]
    assert to_requests(records) == [EditRequest("The capital of {} is", "France", "Rome"),
                                    EditRequest("{} was written by", "Hamlet", "Dickens")]
    res = evaluate_counterfact(tiny_llama, tok, records, progress=False)
    for i, r in enumerate(records):
        new, true = target_nll(tiny_llama, tok, [r.prompt] * 2, [r.target_new, r.ground_truth])
        assert res.es_hits[i] == bool(new < true)
        lnew, ltrue = target_nll(tiny_llama, tok, [r.locality_prompt] * 2, [r.target_new, r.locality_ground_truth])
        assert res.ns_hits[i] == bool(ltrue < lnew)
    assert res.case_ids == [1, 2] and res.es == sum(res.es_hits) / 2


def _zsre(subject: str, src: str) -> ZsreRecord:
    return ZsreRecord(subject=subject, src=src, rephrase=src + " Tell me.", alt="red car", loc="nq question: why",
                      loc_ans="because")


def test_zsre_requests_skip_missing_subjects_and_locality_is_kept_unedited(varied_llama, tok):
    records = [_zsre("UniFirst", "What does UniFirst make?"), _zsre("Acme", "What does Zeta make?")]
    edits = zsre_requests(records)
    assert edits.skipped == 1 and edits.requests == [EditRequest("What does {} make?", "UniFirst", "red car")]
    pre = locality_predictions(varied_llama, tok, edits.records)
    res = evaluate_zsre(varied_llama, tok, edits.records, pre, progress=False)
    assert res.locality == 1.0
    expected = top1_tokens_correct(varied_llama, tok, [records[0].src], ["red car"])
    assert res.edit_hits == pytest.approx(expected.tolist())
    with torch.no_grad():
        for layer in range(4):  # a drastic edit changes locality predictions
            weight_view(varied_llama, layer).add_(torch.randn_like(weight_view(varied_llama, layer)) * 5)
    assert evaluate_zsre(varied_llama, tok, edits.records, pre, progress=False).locality < 1.0


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 3), (10, 4, 2), (9, 9, 8), (50, 7, 1), (3, 8, 7)]:
        scored = [i for w in windows(n, window, stride) for i in range(w.first_scored, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= window for w in windows(n, window, stride))


def _hand_perplexity(model, ids: list[int], window: int) -> float:
    """Non-overlapping chunks, each token scored given its chunk prefix (the first token of a chunk
    gets the previous chunk's last token as its only context, as with stride = window - 1)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = ids[start: start + window]
        with torch.no_grad():
            logp = model(torch.tensor([chunk])).logits[0].float().log_softmax(-1)
        nll -= float(logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("window", [200, 16])
def test_perplexity_equals_exp_mean_nll(tiny_llama, tok, window):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tok(text, add_special_tokens=False).input_ids
    got = perplexity(tiny_llama, tok, text, max_tokens=10_000, window=window, batch_size=3)
    assert got == pytest.approx(_hand_perplexity(tiny_llama, ids, window), rel=1e-4)


def test_norms_are_neutral_for_unchanged_model_and_detect_a_change(tiny_gpt2):
    base = snapshot(tiny_gpt2, [1, 2])
    assert [(n.norm_ratio, n.change_ratio) for n in layer_norms(tiny_gpt2, base)] == [(1.0, 0.0), (1.0, 0.0)]
    assert norm_growth(tiny_gpt2, base) == 1.0
    with torch.no_grad():
        weight_view(tiny_gpt2, 2).mul_(2.0)
    norms = layer_norms(tiny_gpt2, base)
    assert norms[0].norm_ratio == 1.0 and norms[1].norm_ratio == pytest.approx(2.0)
    assert norms[1].change_ratio == pytest.approx(1.0) and norm_growth(tiny_gpt2, base) == pytest.approx(2.0)


def test_known_facts_and_retention_on_the_models_own_answers(varied_llama, tok):
    prompts, answers = greedy_facts(varied_llama, tok)
    facts = [KnownFact(prompt=p, subject=p[:3], target=a, case_id=i) for i, (p, a) in enumerate(zip(prompts, answers))]
    assert known_fact_accuracy(varied_llama, tok, facts) == 1.0
    assert known_fact_accuracy(varied_llama, tok, [f.model_copy(update={"target": "?" + f.target}) for f in facts]) == 0.0
    requests = [EditRequest("{}" + p[3:], p[:3], a) for p, a in zip(prompts, answers)]
    assert retention(varied_llama, tok, requests) == 1.0
    other = [EditRequest(r.prompt, r.subject, r.target[:1] + "?" + r.target[1:]) for r in requests[:2]]
    assert retention(varied_llama, tok, requests[:2] + other, whole_answer=True) == 0.5
    assert retention(varied_llama, tok, other) == 1.0  # the first token (" ") still matches


def test_fact_margins_are_positive_exactly_on_the_models_answers_and_see_forward_hooks(varied_llama, tok):
    prompts, answers = greedy_facts(varied_llama, tok)
    facts = [KnownFact(prompt=p, subject=p[:3], target=a, case_id=i) for i, (p, a) in enumerate(zip(prompts, answers))]
    margins = fact_margins(varied_llama, tok, facts, batch_size=3)
    assert margins.dtype == torch.float64 and (margins > 0).all()
    wrong = [f.model_copy(update={"target": f.target[:1] + "?" + f.target[1:]}) for f in facts]
    assert (fact_margins(varied_llama, tok, wrong) < margins).all()
    layer = varied_llama.model.layers[1].mlp
    handle = layer.register_forward_hook(lambda mod, args, out: out + 3.0 * torch.randn_like(out))
    try:
        hooked = fact_margins(varied_llama, tok, facts)
    finally:
        handle.remove()
    assert not torch.allclose(hooked, margins)  # what runs is the model as it stands, hooks included
    assert torch.equal(fact_margins(varied_llama, tok, facts), margins)


def test_damage_is_the_paired_mean_drop_with_its_standard_error():
    before = torch.tensor([3.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    after = before - torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    d = damage(before, after)
    assert (d.mean, d.n) == (1.0, 4) and d.se == pytest.approx(math.sqrt(2 / 3) / 2)
    assert damage(before, before + 5).mean == -5.0 and damage(before, before + 5).se == 0.0
    with pytest.raises(ValueError, match="not paired"):
        damage(before, after[:3])


@pytest.mark.parametrize("rank", [0, 3])
def test_random_update_has_the_requested_norm_and_rank_per_layer(tiny_llama, rank):
    norms = {1: 0.5, 2: 2.0}
    delta = random_update(tiny_llama, norms, torch.Generator().manual_seed(0), rank)
    for d in delta.layers:
        assert torch.linalg.matrix_norm(d.dense()).item() == pytest.approx(norms[d.layer], rel=1e-5)
        assert d.dense().shape == weight_view(tiny_llama, d.layer).shape
        assert torch.linalg.matrix_rank(d.dense()).item() == (rank or min(d.dense().shape))
    assert layer_norms_of(delta) == pytest.approx(norms, rel=1e-5)
    again = random_update(tiny_llama, norms, torch.Generator().manual_seed(0), rank)
    assert all(torch.equal(a.u, b.u) for a, b in zip(delta.layers, again.layers))


def test_shipped_probe_facts_are_many_answered_and_reserved_from_edits():
    facts = load_probe_facts()
    assert len(facts) >= 300 and len({(f.prompt, f.target) for f in facts}) == len(facts)
    assert {f.dataset for f in facts} <= {CF_VAL, CF_TRAIN, ZSRE}
    train_positions = range(7500, 10000)  # scripts/build_probes.py RESERVED_TRAIN
    train = SHARED / "counterfact" / "counterfact-train.json"
    if train.exists():
        ids = [r["case_id"] for r in json.loads(train.read_text())]
        reserved_ids = {ids[i] for i in train_positions}
        assert {f.record for f in facts if f.dataset == CF_TRAIN} <= reserved_ids
    assert all(f.margin > 0 and f.target for f in facts)
    cf = reserved("counterfact", facts)
    assert cf == {f.record for f in facts if f.dataset != ZSRE}
    assert reserved(ZSRE, facts) == {f.record for f in facts if f.dataset == ZSRE}


def test_benchmark_edit_sets_leave_out_every_record_holding_a_probe_fact(monkeypatch):
    from evaluators.bench import edit_set

    def fact(dataset: str, record: int) -> ProbeFact:
        return ProbeFact(prompt="p", subject="s", target="t", dataset=dataset, record=record, source="prompt",
                                margin=1.0)

    held = [fact(CF_VAL, 5), fact(CF_TRAIN, 7), fact(ZSRE, 1)]
    monkeypatch.setattr(probe_sets, "load_probe_facts", lambda path=None: held)
    records = [CounterFactRecord(case_id=c, prompt="S x", subject="S", target_new="a", ground_truth="b",
                                 rephrase_prompt="r", locality_prompt="l", locality_ground_truth="c")
               for c in [5, 1, 7, 2, 3]]
    assert [r.case_id for r in edit_set(records, 2, "counterfact", Path("x.json"))] == [1, 2]
    assert edit_set(list("abcd"), 3, "zsre", Path(f"/d/{ZSRE}.json")) == ["a", "c", "d"]
    assert edit_set(list("abcd"), 3, "zsre", Path("/d/other.json")) == ["a", "b", "c"]  # only the shipped file


def test_corpus_split_is_at_an_article_and_covers_the_corpus():
    stats, held = corpus.stats_text(), corpus.heldout_text()
    assert stats + held == corpus.corpus_text()
    assert 0.75 < len(stats) / (len(stats) + len(held)) < 0.85
    assert held.startswith(" = ") and held.split("\n", 1)[0].endswith(" = ")
    assert len(corpus.corpus_hash()) == 16


def test_probe_file_parses_and_never_uses_train_cases():
    facts = load_known_facts()
    assert len(facts) >= 100 and len({f.prompt for f in facts}) == len(facts)
    assert all(f.subject in f.prompt and f.target for f in facts)
    train = SHARED / "counterfact" / "counterfact-train.json"
    if not train.exists():
        pytest.skip(f"{train} not present")
    train_ids = {r["case_id"] for r in json.loads(train.read_text())}
    assert not train_ids & {f.case_id for f in facts}


@pytest.mark.parametrize("args, message", [
    (["--values", "nll"], "not JSON"),
    (["--set", "{}"], "expected a JSON list of objects"),
    (["--values", '{"stp": "nll"}'], "unknown hyperparameter 'stp'"),
    (["--set", '[{"entity_weight": 1}, {"alfa": 1}]'], "unknown hyperparameter 'alfa'"),
])
def test_solve_sweep_rejects_bad_overrides_before_loading_a_model(args, message, monkeypatch):
    from click.testing import CliRunner

    from conftest import load_script

    solve_sweep = load_script("solve_sweep")
    monkeypatch.setattr(solve_sweep, "load_model", lambda *a, **k: pytest.fail("model loaded for bad input"))
    result = CliRunner().invoke(solve_sweep.main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_frontier_plot_draws_every_bench_row_and_the_history_into_one_png(tmp_path):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from conftest import load_script

    frontier = load_script("frontier_plot")
    row = {"method": "encore", "n": 10, "batch_size": 5, "es": 0.9, "greedy_es": 0.8, "known_acc_after": 0.95,
           "ppl_before": 20.0, "ppl_after": 21.0, "hparams": {"write": "memory"}}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([row | {"method": "unedited"}, row, row | {"method": "memit", "greedy_es": None,
                                                                           "hparams": {"write": "weights"}}]))
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"variant": "old", "records": "0-999", "es": 0.93, "known_acc_after": 0.57,
                                    "ppl_ratio": 1.23}]))
    points = frontier.from_bench("hold-out 5000-5999", bench)
    assert [(p.variant, p.records, p.ppl_ratio) for p in points] == [
        ("hold-out: encore (memory), 10 in batches of 5", "5000-5999", pytest.approx(1.05)),
        ("hold-out: memit, 10 in batches of 5", "5000-5999", pytest.approx(1.05))]
    out = tmp_path / "frontier.png"
    result = CliRunner().invoke(frontier.main, ["--history", str(history), "--run", f"hold-out 5000-5999={bench}",
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 variants" in result.output
    with Image.open(out) as img:
        img.load()
        assert img.size[0] > 800 and len(img.convert("L").getcolors(maxcolors=1 << 16) or []) > 10  # drawn, not blank
    assert CliRunner().invoke(frontier.main, ["--out", str(out)]).exit_code == 2  # nothing to plot: a usage error


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded model, cached in a temp KAGENT_HOME for this module."""
    from editors.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAGENT_HOME", str(tmp_path_factory.mktemp("kagent-home")))
        yield load_model()


@pytest.mark.slow
def test_smollm2_answers_every_known_fact(smollm2):
    facts = load_known_facts()
    assert known_fact_accuracy(smollm2.model, smollm2.tok, facts) == 1.0


@pytest.mark.slow
def test_smollm2_heldout_perplexity_is_plausible(smollm2):
    ppl = perplexity(smollm2.model, smollm2.tok, corpus.heldout_text(), max_tokens=4096)
    assert 5.0 < ppl < 60.0  # measured 19.79 (SmolLM2-135M-Instruct fp32, first 4,096 held-out tokens, window 1024)
