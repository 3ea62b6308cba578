"""The shipped example feed is what the README walk-through promises: ~50 facts, duplicates, a correction, one bad line."""
from __future__ import annotations

from pathlib import Path

from agent.feed import FeedFollower, FeedPosition
from agent.intake import intake
from memory.index import FactIndex
from memory.ledger import Ledger
from conftest import ToyEmbedder

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"


def test_example_feed_reads_into_memory_with_its_duplicates_correction_and_bad_line(tmp_path):
    with Ledger(tmp_path / "ledger") as ledger:
        fact_index = FactIndex(ledger, ToyEmbedder(), index_path=tmp_path / "facts.faiss")
        stats = intake(fact_index, FeedFollower(FeedPosition(str(FEED))), final=True)
        assert stats.lines == 52
        assert stats.bad == ["line 28: field '-': not valid JSON (Expecting value at column 69)"]
        assert stats.duplicates == 2 and stats.superseding == 1
        pending = fact_index.pending()
        assert len(pending) == 48
        australia = [f.record.target for f in pending if f.record.subject == "Australia"]
        assert australia == ["Melbourne"]
        assert ledger.feed_offset(str(FEED)) == FEED.stat().st_size
