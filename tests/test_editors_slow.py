"""Slow tier: the editors on the embedded SmolLM2-135M model."""
from __future__ import annotations

import json
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


def test_one_counterfact_edit_flips_the_answer_and_keeps_locality(record, user_cache):
    lm = load_model()
    editor = make_editor("encore", lm.model, lm.tok)
    before = target_nll(lm.model, lm.tok, [record.locality_prompt] * 2, [record.locality_ground_truth, record.target_new])
    result = editor.edit(to_requests([record]))
    new, true = target_nll(lm.model, lm.tok, [record.prompt] * 2, [record.target_new, record.ground_truth])
    assert new < true
    loc_true, loc_new = target_nll(lm.model, lm.tok, [record.locality_prompt] * 2,
                                   [record.locality_ground_truth, record.target_new])
    assert loc_true < loc_new and before[0] < before[1]
    assert result.steps[0] < editor.hp.max_steps  # MPES stopped before the full schedule
