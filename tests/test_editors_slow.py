"""Slow tier: one ENCORE edit on the embedded SmolLM2-135M model, in each write mode: the entity memory (measured with
the editor's memory attached to the model, as the agent runs it) and the weight solve (written into the weights)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from editors.models import load_model
from editors.registry import make_editor
from evaluators.counterfact import load_counterfact, to_requests
from evaluators.scoring import target_nll

pytestmark = pytest.mark.slow
CF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


@pytest.fixture(scope="module")
def record():
    if not CF.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return load_counterfact(CF, 1)[0]


@pytest.mark.parametrize("write", ["memory", "weights"])
def test_one_counterfact_edit_flips_the_answer_and_keeps_locality(record, write, user_cache):
    lm = load_model()
    editor = make_editor("encore", lm.model, lm.tok, write=write)
    before = target_nll(lm.model, lm.tok, [record.prompt, record.locality_prompt],
                        [record.target_new, record.locality_ground_truth])
    result = editor.edit(to_requests([record]))
    assert (result.delta.memory is not None) == (write == "memory")
    edited = editor.memory.attached(lm.model) if write == "memory" else contextlib.nullcontext()
    with edited:  # the memory's slots change nothing until attached (the agent keeps them attached)
        new, true = target_nll(lm.model, lm.tok, [record.prompt] * 2, [record.target_new, record.ground_truth])
        loc_true, loc_new = target_nll(lm.model, lm.tok, [record.locality_prompt] * 2,
                                       [record.locality_ground_truth, record.target_new])
    assert new < true and new < before[0]  # the edit moved the answer to the new target
    assert loc_true < loc_new and abs(loc_true - before[1]) < 0.5  # another subject's answer kept
    assert result.steps[0] < editor.hp.max_steps  # MPES stopped before the full schedule
