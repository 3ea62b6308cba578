"""Slow tier: the README walk-through on the embedded SmolLM2 model (init, watch the example feed, ask, history,
report, rollback)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli

FEED = Path(__file__).resolve().parent.parent / "examples" / "feed.jsonl"


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.slow
def test_example_feed_on_the_embedded_model(tmp_path):
    ws = tmp_path / "ws"
    run("init", "--workspace", ws)
    summary = run("watch", FEED, "--once", "--workspace", ws).strip().splitlines()[-1]
    assert summary.startswith("52 line(s): 48 new fact(s), 2 duplicate(s), 1 superseding, 1 bad;")
    facts = run("facts", "--status", "applied", "--workspace", ws).splitlines()
    assert len(facts) >= 40  # most of the 48 facts pass the guard
    hits = 0
    for line in facts:
        text, target = re.search(r"batch \d+  (.+) -> (.+)$", line).groups()
        hits += run("ask", text, "--tokens", "8", "--workspace", ws).startswith(f"{text} {target}")
    assert hits >= 0.7 * len(facts)
    assert "Melbourne" in run("facts", "--subject", "Australia", "--workspace", ws)
    history = json.loads(run("history", "--json", "--limit", "0", "--workspace", ws))
    assert sum(h["facts"] for h in history if h["status"] == "committed") == len(facts)
    out = tmp_path / "report.html"
    run("report", "--out", out, "--workspace", ws)
    assert out.read_text().count("data:image/png") == 3 and f"{len(facts)} edits applied" in out.read_text()
    run("rollback", "--to", "0", "--workspace", ws)
    eiffel = run("ask", "The Eiffel Tower is located in the city of", "--workspace", ws)
    assert "Rome" not in eiffel  # back to the unedited model
