"""The fact index across SIGKILLs: a feed read into a ledger + fact index is killed at each point where the vector
log, the snapshot and the ledger disagree, then read to the end. Nothing is lost or stored twice (the ledger equals
an uninterrupted run's), the index holds exactly the ledger's facts with the right vectors, and recovery re-embeds
nothing the log or the snapshot still held. The runs are forked from one child process (tests/index_kill_child.py)
that imports kagent once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from memory.index import FactIndex
from memory.ledger import Ledger

CHILD = Path(__file__).resolve().parent / "index_kill_child.py"
LINES = 900  # four 256-line chunks; snapshots after chunks 1, 2 and 4
PHASES = {"log-appended": 2, "chunk-committed": 2, "index-renamed": 2, "meta-written": 2, "torn-record": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    base = tmp_path_factory.mktemp("index-kill")
    feed = base / "feed.jsonl"
    load_script("feedbench").write_feed(feed, LINES)
    jobs = [{"phase": p, "hit": hit, "dir": str(base / p), "feed": str(feed)}
            for p, hit in {"none": 0, **PHASES}.items()]
    (base / "jobs.json").write_text(json.dumps(jobs))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, str(CHILD), str(base / "jobs.json")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return base, {r["phase"]: r for r in map(json.loads, res.stdout.splitlines())}


def ledger_state(workdir: Path) -> tuple[list, int]:
    with Ledger(workdir / "ledger") as ledger:
        facts = [(f.id, f.record.to_json(), f.status, f.reason, f.superseded_by) for f in ledger.facts()]
        return facts, ledger.feed_offset(next(iter(ledger.db.execute("SELECT feed FROM feed_offsets")))[0])


def test_the_uninterrupted_run_reads_every_line(runs):
    base, out = runs
    assert out["none"]["lines"] == LINES and out["none"]["reembedded"] == 0
    facts, _ = ledger_state(base / "none")
    assert len(facts) == out["none"]["added"] > 0.8 * LINES


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_kill_loses_nothing_stores_nothing_twice_and_reembeds_nothing(runs, phase):
    base, out = runs
    assert out[phase]["killed"], out[phase]
    assert 0 < out[phase]["lines"] < LINES  # killed mid-feed, and the recovery read the rest
    assert out[phase]["reembedded"] == 0  # the snapshot and the log held every committed fact's vector
    assert ledger_state(base / phase) == ledger_state(base / "none")


@pytest.mark.parametrize("phase", list(PHASES))
def test_after_recovery_the_index_holds_exactly_the_ledgers_facts(runs, phase):
    base, _ = runs
    embedder = load_script("feedbench").HashEmbedder()
    calls = []
    real = embedder.embed
    embedder.embed = lambda texts: calls.append(len(texts)) or real(texts)
    with Ledger(base / phase / "ledger") as ledger:
        fact_index = FactIndex(ledger, embedder, index_path=base / phase / "facts.faiss")
        facts = ledger.facts()
        assert fact_index.index().ntotal == len(facts) and calls == []  # loaded, not embedded
        expected = real([f.record.relation for f in facts])
        assert np.allclose(fact_index.vectors([f.id for f in facts]), expected, atol=1e-6)
