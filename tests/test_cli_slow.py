"""Slow tier: the README walk-through on the embedded SmolLM2 model (init, watch the example feed, ask, history,
report, rollback)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"
NEW_FACTS = 48  # distinct facts in FEED once duplicates, the superseded Sydney line and the bad line are gone


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.slow
def test_example_feed_on_the_embedded_model(tmp_path, user_cache):
    ws = tmp_path / "ws"
    t0 = time.perf_counter()
    run("init", "--workspace", ws)
    t1 = time.perf_counter()
    summary = run("watch", FEED, "--once", "--workspace", ws).strip().splitlines()[-1]
    t2 = time.perf_counter()
    assert summary.startswith(f"52 line(s): {NEW_FACTS} new fact(s), 2 duplicate(s), 1 superseding, 1 bad;")
    facts = run("facts", "--status", "applied", "--workspace", ws).splitlines()
    assert len(facts) >= 40  # most of the 48 facts pass the guard
    hits = 0
    for line in facts:
        text, target = re.search(r"batch \d+  (.+) -> (.+)$", line).groups()
        hits += run("ask", text, "--tokens", "8", "--workspace", ws).startswith(f"{text} {target}")
    print(f"{summary}\nask: {hits}/{len(facts)} applied facts answered with the new target; init "
          f"{t1 - t0:.0f}s, watch {t2 - t1:.0f}s, ask x{len(facts)} {time.perf_counter() - t2:.0f}s")
    # the issue asks for the new target on "most facts": more than half of the 48 the feed brings (measured: 33 of
    # 43 applied in arrival order, 29 of 45 in cluster order; a committed edit does not always flip the greedy
    # answer, see the batches' efficacy metric)
    assert hits > NEW_FACTS / 2
    assert "Melbourne" in run("facts", "--subject", "Australia", "--workspace", ws)
    history = json.loads(run("history", "--json", "--limit", "0", "--workspace", ws))
    assert sum(h["facts"] for h in history if h["status"] == "committed") == len(facts)
    out = tmp_path / "report.html"
    run("report", "--out", out, "--workspace", ws)
    assert out.read_text().count("data:image/png") == 4 and f"{len(facts)} edits applied" in out.read_text()
    run("rollback", "--to", "0", "--workspace", ws)
    eiffel = run("ask", "The Eiffel Tower is located in the city of", "--workspace", ws)
    assert "Paris" in eiffel and "Rome" not in eiffel  # back to the unedited model
