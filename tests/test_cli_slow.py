"""Slow tier: the README walk-through on the embedded SmolLM2 model (init, watch the example feed, check, history,
report, rollback, ask)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import STATS_TOKENS
from test_smoke import run

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"
NEW_FACTS = 48  # distinct facts in FEED once duplicates, the superseded Sydney line and the bad line are gone


@pytest.mark.slow
def test_example_feed_on_the_embedded_model(tmp_path, user_cache):
    ws = tmp_path / "ws"
    t0 = time.perf_counter()
    run("init", "--stats-tokens", STATS_TOKENS, "--workspace", ws)  # the statistics real_model_home has ready
    t1 = time.perf_counter()
    summary = run("watch", FEED, "--once", "--workspace", ws).strip().splitlines()[-1]
    t2 = time.perf_counter()
    assert summary.startswith(f"52 line(s): {NEW_FACTS} new fact(s), 2 duplicate(s), 1 superseding, 1 bad;")
    facts = json.loads(run("facts", "--status", "applied", "--json", "--workspace", ws))
    assert len(facts) >= 40  # most of the 48 facts pass the guard
    checked = json.loads(run("check", "--json", "--workspace", ws))  # exit 0: every applied fact answers its target
    assert sorted(r["fact"] for r in checked) == sorted(f["id"] for f in facts)
    print(f"{summary}\ncheck: {len(checked)} applied facts answer with the new target; init {t1 - t0:.0f}s, watch "
          f"{t2 - t1:.0f}s, check {time.perf_counter() - t2:.0f}s")
    assert "Melbourne" in run("facts", "--subject", "Australia", "--workspace", ws)
    history = json.loads(run("history", "--json", "--limit", "0", "--workspace", ws))
    assert sum(h["facts"] for h in history if h["status"] == "committed") == len(facts) + sum(
        f["status"] == "failed" for f in json.loads(run("facts", "--json", "--workspace", ws)))
    out = tmp_path / "report.html"
    run("report", "--out", out, "--workspace", ws)
    html = out.read_text()
    for title in ("Two tiers", "Downstream probes", "Event timeline"):  # memory batches move no weight: no norm plot
        assert f"<img alt='{title}" in html, title
    assert f"{len(facts)} edits applied" in html
    run("rollback", "--to", "0", "--workspace", ws)
    eiffel = run("ask", "The Eiffel Tower is located in the city of", "--workspace", ws)
    assert "Paris" in eiffel and "Rome" not in eiffel  # back to the unedited model
