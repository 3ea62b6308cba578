"""Slow tier: the real MiniLM embedder recognises a paraphrased relation as the same fact."""
from __future__ import annotations

import pytest

from memory.index import FactIndex, MiniLMEmbedder
from memory.ledger import Ledger
from memory.record import FactRecord

pytestmark = pytest.mark.slow

SUBJECT = "Eiffel Tower"


def test_real_embedder_supersedes_paraphrased_relation(tmp_path):
    idx = FactIndex(Ledger(tmp_path), MiniLMEmbedder(device="cpu"))
    (old,) = idx.add([FactRecord(subject=SUBJECT, prompt="{} is located in", target="Paris")]).added
    other = idx.add([FactRecord(subject=SUBJECT, prompt="{} was designed by", target="Gustave Eiffel"),
                     FactRecord(subject=SUBJECT, prompt="{} was born in", target="Dijon")])
    assert other.dropped_pending == {} and len(other.added) == 2  # different relations of the subject stay
    plan = idx.add([FactRecord(subject=SUBJECT, prompt="{} is situated in", target="Rome")])
    assert plan.dropped_pending == {old: plan.added[0]}
