"""The memory tier's monitors (evaluators/monitors/memory_tier.py) on a toy tokenizer: slot norm against the residual norm,
firing on held-out lines, subjects inside other subjects and common-word subjects."""
from __future__ import annotations

import torch

from editors.entity_memory import EntityMemory, MemoryWrite
from evaluators.monitors.memory_tier import HeldOut, collisions, memory_health


def test_monitors_count_firing_norms_and_collisions(tok):
    subjects = ["Paris", "Paris Hilton", "Oslo"]
    deltas = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])  # norms 5, 1, 1
    memory = EntityMemory.from_write(tok, MemoryWrite(0, subjects, deltas))
    lines = ["we went to Paris in May", "nothing here at all", "the weather was fine", "Paris Hilton sang"]
    text = HeldOut([tok(l, add_special_tokens=False)["input_ids"] for l in lines], residual_norm=2.0, layer=0)
    health = memory_health(memory, text, common_share=0.25)
    m = health.metrics
    assert m["memory_slots"] == 3 and m["memory_slot_norm"] == 2.5 and abs(m["memory_slot_norm_mean"] - 7 / 6) < 1e-6
    assert m["memory_fire_rate"] == 0.5  # two of four lines name a stored subject
    assert health.firing == {"Paris": 2, "Paris Hilton": 1}  # "Paris" fires inside "Paris Hilton" too: a collision
    assert ("Paris", "Paris Hilton") in health.colliding and m["memory_collisions"] >= 1
    assert health.common == ["Paris", "Paris Hilton"] and m["memory_common"] == 2  # each in >= 1 of 4 lines


def test_an_empty_memory_reports_no_slots(tok):
    assert memory_health(None, HeldOut([], 1.0, 0)).metrics == {"memory_slots": 0.0}
    assert collisions(tok, ["Oslo", "Rome"]) == []
