"""Slow tier: the real MiniLM embedder recognises a paraphrased relation as the same fact."""
from __future__ import annotations

import pytest

from memory.index import FactMemory, MiniLMEmbedder
from memory.ledger import Ledger
from memory.record import FactRecord

pytestmark = pytest.mark.slow

SUBJECT = "Eiffel Tower"


def test_real_embedder_supersedes_paraphrased_relation(tmp_path):
    mem = FactMemory(Ledger(tmp_path), MiniLMEmbedder(device="cpu"))
    (old,) = mem.add([FactRecord(subject=SUBJECT, prompt="{} is located in", target="Paris")]).added
    other = mem.add([FactRecord(subject=SUBJECT, prompt="{} was designed by", target="Gustave Eiffel"),
                     FactRecord(subject=SUBJECT, prompt="{} was born in", target="Dijon")])
    assert other.dropped_pending == {} and len(other.added) == 2  # different relations of the subject stay
    plan = mem.add([FactRecord(subject=SUBJECT, prompt="{} is situated in", target="Rome")])
    assert plan.dropped_pending == {old: plan.added[0]}
