"""The RAM budget (agent/budget.py) and the batch estimate it uses (editors/footprint.py), on the tiny models:
the estimate grows with what the value optimisation holds, a batch over the budget is split into consecutive
groups that fit, a fact over it alone is set aside with the estimate and the budget in its reason. The estimate's
calibration against measured peak RSS on SmolLM2 is in RELIABILITY.md (scripts/ram_calibration.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

import agent.budget
from agent.admission import AdmittedOutcome
from agent.budget import RamBudget, budget_mb, total_ram_mb
from agent.config import AgentConfig
from editors.footprint import Dims, EditTokens, edit_tokens, estimate
from editors.hparams import EditHParams
from editors.prompts import EditRequest
from memory.record import FactRecord, StoredFact

TEMPLATES = ["The day was long. {}", "I think so. {}"]
HP = EditHParams(layers=[1, 2], n_context=2, value_chunk=4)


def edit(prompt: str = "{} is in", target: str = "Peru", subject: str = "Quito") -> EditRequest:
    return EditRequest(prompt, subject, target)


@pytest.fixture
def dims(tiny_llama):
    return Dims.of(tiny_llama)


def mb(dims, tok, requests, hp=HP) -> float:
    return estimate(dims, [edit_tokens(tok, r, TEMPLATES) for r in requests], hp).values_mb


def test_edit_tokens_are_the_rows_the_optimiser_runs(tok):
    got = edit_tokens(tok, edit(target="Peru"), TEMPLATES)
    assert len(got.rows) == 1 + len(TEMPLATES) + 1  # plain prompt, one per context, the KL row
    prefix, suffix, target = got.rows[0]
    assert (prefix, suffix, target) == (len("Quit"), len("o is in") + len(" Peru") - 1, len(" Peru"))
    assert got.rows[-1][2] == 0 and got.order == suffix


def test_the_value_estimate_grows_with_the_suffix_and_the_rows(dims, tok):
    short, long = mb(dims, tok, [edit()]), mb(dims, tok, [edit("{} is " + "very " * 40 + "far in")])
    assert long > short
    assert mb(dims, tok, [edit()] * 4) > short  # four edits in one chunk: four times the rows
    # a long prompt placed before the subject costs less than after it (the prefix runs without gradients)
    assert mb(dims, tok, [edit("Far " * 40 + "{} is in")]) < long


def test_values_are_estimated_per_chunk_as_the_optimiser_sorts_them(dims, tok):
    long = edit("{} is " + "very " * 40 + "far in")
    mixed = [edit()] * 4 + [long]  # value_chunk 4: the long edit sorts into a chunk of its own
    assert mb(dims, tok, mixed) == pytest.approx(mb(dims, tok, [long]))
    assert mb(dims, tok, [edit()] * 3 + [long]) > mb(dims, tok, [long])  # one chunk of four


def test_the_default_budget_is_a_sixth_of_the_ram():
    assert budget_mb(AgentConfig()) == pytest.approx(total_ram_mb() / 6)
    assert budget_mb(AgentConfig(ram_budget_mb=1234)) == 1234


@dataclass
class FakeSession:
    """What RamBudget reads of a session: config, tokenizer, model, and the editor's hparams and templates."""

    cfg: AgentConfig
    tok: object
    model: object
    editor: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        hp=HP, state=SimpleNamespace(context_templates=TEMPLATES)))

    def request(self, fact: StoredFact):
        return fact.record.to_request()  # a session without relation forms (agent.session.Session.request)


def stored(i: int, prompt: str = "{} is in") -> StoredFact:
    return StoredFact(i, FactRecord(subject=f"Town{i}", prompt=prompt, target="X"), "pending", None, None, None)


@pytest.fixture
def budget(tok, tiny_llama, monkeypatch):
    monkeypatch.setattr(agent.budget, "resident_mb", lambda: 100.0)
    return RamBudget(FakeSession(AgentConfig(ram_budget_mb=1e6), tok, tiny_llama))


def test_a_batch_over_the_budget_is_split_into_consecutive_groups_that_fit(budget):
    facts = [stored(i) for i in range(6)]
    two = budget.working_mb([budget.tokens(f) for f in facts[:2]])
    three = budget.working_mb([budget.tokens(f) for f in facts[:3]])
    budget.limit_mb = 100.0 + (two + three) / 2  # two facts fit, three do not
    split = budget.split(facts)
    assert [[f.id for f in g] for g in split.groups] == [[0, 1], [2, 3], [4, 5]] and not split.too_big
    assert all(e <= budget.limit_mb for e in split.estimates)
    assert budget.split(facts, alone=True).groups == [[f] for f in facts]


def test_a_fact_over_the_budget_alone_is_set_aside_with_the_estimate(budget):
    big = stored(9, "{} is " + "very " * 60 + "far in")
    small = [stored(i) for i in range(3)]
    budget.limit_mb = 100.0 + budget.working_mb([budget.tokens(f) for f in small])
    split = budget.split(small[:2] + [big] + small[2:])
    assert [[f.id for f in g] for g in split.groups] == [[0, 1, 2]]
    [(fact, reason)] = split.too_big
    assert fact.id == 9 and reason.startswith("RAM: applying it alone would take the process to ~")
    assert reason.endswith(f"over the budget of {budget.limit_mb:.0f} MiB (config key ram_budget_mb)")
    assert not split.gpu


def test_an_empty_batch_measures_nothing(budget, monkeypatch):
    monkeypatch.setattr(agent.budget, "resident_mb", lambda: pytest.fail("measured for nothing"))
    assert budget.split([]).groups == []


def test_every_fact_at_the_intake_limits_fits_the_default_budget_alone_on_smollm2_dimensions():
    """The defaults are chosen together: a fact at every token limit fits alone on the embedded model, probes
    included, with the weights and the fact index resident."""
    from editors.hparams import SMOLLM2

    cfg = AgentConfig()
    dims = Dims(hidden=576, inter=1536, heads=9, head_dim=64, kv_dim=192, vocab=49152, layers=30, dtype_bytes=4,
                fast=True)
    hp = EditHParams(**SMOLLM2)
    context = 13  # tokens of a generated context prefix (10 generated + seed word + ".")
    row = (context + 1, cfg.max_prompt_tokens + cfg.max_target_tokens, cfg.max_target_tokens)
    worst = EditTokens((row,) * (1 + hp.n_context) + ((context, cfg.max_prompt_tokens, 0),),
                       context + cfg.max_prompt_tokens, cfg.max_prompt_tokens + cfg.max_target_tokens)
    edit = estimate(dims, [worst], hp).working_mb
    working = max(edit, agent.budget.probes_mb(dims, cfg) + agent.budget.KEPT_SHARE * edit)
    resident = 1100  # MiB a watch process on SmolLM2 holds before its first batch, weights paged in (RELIABILITY.md)
    assert resident + working < 4096 - 1024  # and 1 GiB to spare


def fake_cuda(monkeypatch, free_mb: float, allocated_mb: float, reserved_mb: float) -> None:
    """The model's parameters 'on' CUDA device 0 with the given allocator figures (no GPU needed): torch.cuda's
    queries and editors.devices' device lookup are replaced for this test only."""
    import editors.devices

    mib = 2**20
    monkeypatch.setattr(editors.devices, "cuda_devices", lambda model: [0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(free_mb * mib), int(80_000 * mib)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: int(allocated_mb * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: int(reserved_mb * mib))


def test_on_cuda_the_batch_is_counted_against_the_gpu_memory_not_the_ram(budget, monkeypatch):
    monkeypatch.setattr(agent.budget, "resident_mb", lambda: pytest.fail("host RAM measured for a GPU batch"))
    facts = [stored(i) for i in range(4)]
    one, two, three = (budget.working_mb([budget.tokens(f) for f in facts[:n]]) for n in (1, 2, 3))
    # 500 MiB held, and room on the GPU (free + reserved-but-unused, x GPU_SHARE) for two facts but not three
    room = (two + three) / 2
    fake_cuda(monkeypatch, free_mb=room / agent.budget.GPU_SHARE - 50, allocated_mb=500, reserved_mb=550)
    split = budget.split(facts)
    assert split.limit_mb == pytest.approx(500 + room) and split.gpu
    assert [[f.id for f in g] for g in split.groups] == [[0, 1], [2, 3]]
    assert all(500 < e <= split.limit_mb for e in split.estimates)
    fake_cuda(monkeypatch, free_mb=one / 2, allocated_mb=500, reserved_mb=500)  # the GPU is nearly full
    split = budget.split(facts[:1])
    [(fact, reason)] = split.too_big
    assert reason.startswith("GPU RAM: applying it alone would take the GPU to ~") and "500 held" in reason


def test_the_watch_line_says_whose_ram_the_estimate_and_peak_are():
    assert AdmittedOutcome().ram_note() == ""
    assert AdmittedOutcome(estimates=[900.4, 1200.0], peaks=[800.0, 1000.6]).ram_note() == \
        "  RAM est 1200 MiB, peak 1001 MiB"
    on_gpu = AdmittedOutcome(estimates=[300.0], peaks=[250.0], gpu=True)
    assert on_gpu.ram_note() == "  GPU RAM est 300 MiB, peak 250 MiB"
