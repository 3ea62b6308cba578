"""Slow tier: the hostile-input and kill suites on the embedded SmolLM2-135M, each `kagent` run a separate process
whose peak RSS (the kernel's, via wait4) must stay under the 4 GB the RAM budget keeps on this 24 GiB machine.

- A feed mixing good facts with a hostile line of every kind (over every intake limit, control and bidirectional
  characters, invisible-only text), on a workspace where an older kagent left a pending fact with a prompt of a few
  thousand words (the fact that made `watch` grow to 24 GB and die on every run): `kagent watch --once` exits 0
  twice in a row, and every good fact is applied or quarantined for a reason of its own.
- A fact whose batch is SIGKILLed from inside compute on every run, as the OOM killer did: three deaths, then the
  next `watch` finishes with it quarantined ("stopped the editor 3 times") and nothing else lost.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.admission import RAM_PHASE
from conftest import STATS_TOKENS
from memory.ledger import Ledger
from memory.record import FactRecord

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

TESTS = Path(__file__).resolve().parent
FEED = TESTS.parent / "examples" / "feed.jsonl"
PEAK_LIMIT_MB = 4096
GUARD_REASONS = ("probe", "interference", "nonfinite")  # a good fact may be set aside by the guard, for itself
RUNNER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
args, poison = sys.argv[1:], None
if args[0] == "--poison":
    poison, args = args[1], args[2:]
    import test_reliability_support
    test_reliability_support.poison(poison)
from agent.cli import cli
cli.main(args, prog_name="kagent")
"""


def kagent(logfile: Path, *args, poison: str | None = None) -> tuple[int, float, str]:
    """`kagent ARGS` in a fresh process: (exit code or -signal, its peak RSS in MiB, its output)."""
    cmd = [sys.executable, "-c", RUNNER] + (["--poison", poison] if poison else []) + [str(a) for a in args]
    env = os.environ | {"TQDM_DISABLE": "1"}
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=TESTS.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, logfile.read_text()


def good_lines(n: int) -> list[str]:
    return FEED.read_text().splitlines()[:n]


def line(subject: str, prompt: str = "{} is located in the city of", target: str = "Lisbon", **extra) -> str:
    return json.dumps({"subject": subject, "prompt": prompt, "target": target} | extra)


WORDS = " ".join(["and then the story went on"] * 500)  # ~3,000 words
HOSTILE = {  # kind -> (line, field named in the rejection)
    "prompt of a few thousand words": (line("Old Bridge", "The {} " + WORDS + " is in the city of"), "prompt"),
    "long target": (line("Red Tower", target="the city " * 20), "target"),
    "long old_target": (line("Blue Gate", old_target="the city " * 20), "old_target"),
    "too many paraphrases": (line("Green Hall", paraphrases=[f"Green Hall is in {i}" for i in range(500)]),
                             "paraphrases"),
    "long paraphrase": (line("Grey Fort", paraphrases=["The {} " + WORDS]), "paraphrases.0"),
    "too many neighbours": (line("White Arch", neighbors=[{"prompt": f"Town {i} is in", "target": "X"}
                                                          for i in range(200)]), "neighbors"),
    "long neighbour prompt": (line("Black Keep", neighbors=[{"prompt": WORDS, "target": "X"}]), "neighbors.0.prompt"),
    "long neighbour target": (line("Pink Spire", neighbors=[{"prompt": "Rome is in", "target": "the city " * 20}]),
                              "neighbors.0.target"),
    "bidirectional override": (line("Gold Dome", target="\u202enobsiL"), "target"),
    "bidirectional isolate": (line("Silver\u2066 Mill\u2069"), "subject"),
    "NUL": (line("Iron\u0000 Wharf"), "subject"),
    "escape character": (line("Tin Lane", target="Lis\u001b[31mbon"), "target"),
    "line separator": (line("Copper Yard", "{} is located\u2028in the city of"), "prompt"),
    "zero-width only": (line("Jade Court", target="\u200b\u200d"), "target"),
    "lone surrogate": ('{"subject": "Ivory \\ud800Hall", "prompt": "{} is located in the city of", '
                       '"target": "Lisbon"}', "subject"),
}


@pytest.fixture(scope="module")
def smollm2_workspace(real_model_home, tmp_path_factory):
    """`kagent init` on the embedded model, once for the module (tests copy it), on the statistics real_model_home
    has ready (the suites test intake and crashes, not the statistics' size)."""
    home = real_model_home
    root = tmp_path_factory.mktemp("smollm2") / "ws"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAGENT_HOME", str(home))
        code, peak, out = kagent(root.parent / "init.log", "init", "--stats-tokens", STATS_TOKENS, "--workspace", root)
    assert code == 0, out[-3000:]
    return root, home


@pytest.fixture
def ws(smollm2_workspace, tmp_path, monkeypatch):
    root, home = smollm2_workspace
    monkeypatch.setenv("KAGENT_HOME", str(home))
    return Path(shutil.copytree(root, tmp_path / "ws"))


def own_reason(reason: str | None) -> bool:
    return reason is not None and reason.startswith(GUARD_REASONS)


def test_hostile_feed_twice_on_the_embedded_model(ws, tmp_path):
    old = FactRecord(subject="Stone Quay", prompt="The {} " + WORDS + " is located in the city of", target="Oslo")
    with Ledger(ws / "ledger") as ledger:  # what an older kagent stored: the 24 GB fact, pending
        [old_id] = ledger.add_facts([old])
    good = good_lines(6)
    hostile = list(HOSTILE.values())
    feed = tmp_path / "hostile.jsonl"
    mixed = [good[0], good[1]] + [h for h, _ in hostile[:8]] + good[2:4] + [h for h, _ in hostile[8:]] + good[4:]
    feed.write_text("\n".join(mixed) + "\n")
    runs = [kagent(tmp_path / f"watch{i}.log", "watch", feed, "--once", "--workspace", ws) for i in (1, 2)]
    for code, peak, out in runs:
        assert code == 0, out[-3000:]
        assert peak < PEAK_LIMIT_MB, (peak, out[-2000:])
    first, second = runs[0][2], runs[1][2]
    for (text, field), lineno in zip(hostile, [mixed.index(h) + 1 for h, _ in hostile]):
        assert re.search(rf"^skipped bad line {lineno}: field '{re.escape(field)}': ", first, re.M), (field, first)
    assert re.search(rf"^quarantined fact {old_id} \(The Stone Quay and then.*intake check: field 'prompt': \d+ "
                     r"tokens with the subject filled in, over the limit of 64", first, re.M), first
    assert f"{len(mixed)} line(s): 6 new fact(s), 0 duplicate(s), 0 superseding, {len(hostile)} bad;" in first
    assert "0 line(s): 0 new fact(s)" in second and "0 applied in 0 batch(es)" in second
    with Ledger(ws / "ledger") as ledger:
        facts = ledger.facts()
        assert ledger.verify() == []
        ram = [ledger.metrics(b.id).get(RAM_PHASE) for b in ledger.history()]
    good_facts = [f for f in facts if f.id != old_id]
    assert len(good_facts) == 6 and all(f.status == "applied" or (f.status == "quarantined" and own_reason(f.reason))
                                        for f in good_facts), [(f.status, f.reason) for f in good_facts]
    assert ram and all(m and m["peak_rss_mb"] < PEAK_LIMIT_MB for m in ram), ram
    log.warning("watch peaks %.0f / %.0f MiB; batches' RAM %s; %d of 6 good facts applied", runs[0][1],
                runs[1][1], ram, sum(f.status == "applied" for f in good_facts))


def test_a_fact_that_kills_the_editor_on_the_embedded_model(ws, tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("\n".join(good_lines(4)) + "\n")
    poison = json.loads(good_lines(4)[1])["subject"]
    runs = []
    for i in range(4):
        runs.append(kagent(tmp_path / f"watch{i}.log", "watch", feed, "--once", "--workspace", ws, poison=poison))
        if runs[-1][0] == 0:
            break
    assert [code for code, _, _ in runs] == [-9, -9, -9, 0], [out[-1500:] for _, _, out in runs]
    assert all(peak < PEAK_LIMIT_MB for _, peak, _ in runs), [peak for _, peak, _ in runs]
    assert re.search(rf"^quarantined fact \d+ \(The {poison} is located .*\): stopped the editor 3 times", runs[-1][2],
                     re.M), \
        runs[-1][2][-3000:]
    with Ledger(ws / "ledger") as ledger:
        facts = {f.record.subject: f for f in ledger.facts()}
        crashes = ledger.events("crash")
        assert ledger.verify() == [] and not ledger.facts(status="pending")
    assert len(facts) == 4 and facts[poison].status == "quarantined"
    assert [len(e.data["facts"]) for e in crashes] == [4, 4, 1]
    assert all(f.status == "applied" or own_reason(f.reason) for s, f in facts.items() if s != poison)
    log.warning("peaks %s MiB; %s", [round(p) for _, p, _ in runs],
                "; ".join(f"{s}: {f.status} {f.reason or ''}" for s, f in facts.items()))
