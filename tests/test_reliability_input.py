"""Bad-input reliability: a corpus of malformed (and awkward-but-valid) feed lines run through `parse_line` and
through `kagent watch --once` on a workspace already holding facts, plus hypothesis properties of the record
parser and of ledger rollback (k random low-rank batches, roll back j: weights equal applying the first k - j).

Lines that expose a crash in the parser are marked xfail(strict=True) with the bug described; see RELIABILITY.md.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import unicodedata
import weakref
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_script, make_tiny_llama, rand_delta
from agent.admission import RAM_PHASE
from agent.workspace import Workspace
from editors.arch import weight_view
from memory.ledger import Ledger
from memory.model_sync import attach, commit_applied, load_into, rollback_to
from memory.record import BadRecord, FactRecord, parse_line
from test_reliability_support import _patched, one_thread, run, shared_workspace

log = logging.getLogger(__name__)

# FAKE for this module (conftest.every_fact_answers): every fact answers. The workspaces here hold a tiny random model
# that cannot answer an edited fact; these tests check what bad input and the RAM budget do to the agent, not
# whether edits take (tests/test_tiny_fact_model.py asks a model that answers).
pytestmark = pytest.mark.usefixtures("facts_answer")


def escaped(field: str) -> str:
    """A field name as one-line error messages show it (control characters escaped)."""
    return field.encode("unicode_escape").decode("ascii")

def rec(subject: str = "Quito", prompt: str = "{} is the capital of", target: str = "Peru", **extra) -> bytes:
    return json.dumps({"subject": subject, "prompt": prompt, "target": target} | extra).encode()


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes  # the line without its newline
    ok: bool  # accepted by `kagent watch` (a new pending fact) or rejected as a bad line
    field: str | None = None  # field named in the rejection ("-" = not a JSON object)
    parse_ok: bool | None = None  # parse_line's verdict when it differs from the feed's (None: same as ok)
    bug: str | None = None  # a known crash: the case is xfail(strict=True) with this reason
    limit: str | None = None  # the config key of the intake limit (agent/limits.py) the line is over

    @property
    def parses(self) -> bool:
        return self.ok if self.parse_ok is None else self.parse_ok


MB3 = rec(subject="Lima", target="x" * (3 << 20))
CORPUS = [
    Case("truncated_json", b'{"subject": "Quito", "prompt"', False, "-"),
    Case("plain_text", b"hello world", False, "-"),
    Case("json_array", b'["Quito", "Peru"]', False, "-"),
    Case("json_string", b'"Quito is the capital of Peru"', False, "-"),
    Case("json_number", b"42", False, "-"),
    Case("json_null", b"null", False, "-"),
    Case("empty_object", b"{}", False, "subject"),
    Case("trailing_comma", b'{"subject": "Quito", "prompt": "{} is", "target": "Peru",}', False, "-"),
    Case("utf8_bom", b"\xef\xbb\xbf" + rec(), False, "-"),
    Case("missing_target", json.dumps({"subject": "Quito", "prompt": "{} is in"}).encode(), False, "target"),
    Case("missing_subject", json.dumps({"prompt": "{} is in", "target": "Peru"}).encode(), False, "subject"),
    Case("unknown_field", rec(colour="red"), False, "colour"),
    Case("target_is_int", json.dumps({"subject": "Quito", "prompt": "{} is", "target": 5}).encode(), False, "target"),
    Case("target_is_nan", b'{"subject": "Quito", "prompt": "{} is", "target": NaN}', False, "target"),
    Case("subject_is_list", rec(subject=["Quito"]), False, "subject"),  # type: ignore[arg-type]
    Case("prompt_is_null", json.dumps({"subject": "Quito", "prompt": None, "target": "Peru"}).encode(), False,
         "prompt"),
    Case("id_is_int", rec(id=5), False, "id"),
    Case("old_target_is_list", rec(old_target=["Chile"]), False, "old_target"),
    Case("empty_target", rec(target=""), False, "target"),
    Case("whitespace_target", rec(target="   \t"), False, "target"),
    Case("leading_space_target", rec(target=" Peru"), False, "target"),
    Case("whitespace_subject", rec(subject="\t ", prompt="{} is the capital of"), False, "subject"),
    Case("subject_not_in_prompt", rec(prompt="It is the capital of"), False, "prompt"),
    Case("two_placeholders", rec(prompt="{} and {} are capitals of"), False, "prompt"),
    Case("five_placeholders", rec(prompt="{}{}{}{}{}"), False, "prompt"),
    Case("paraphrases_not_list", rec(paraphrases="Quito lies in"), False, "paraphrases"),
    Case("paraphrase_blank", rec(paraphrases=["Quito lies in", "  "]), False, "paraphrases"),
    Case("paraphrases_ints", rec(paraphrases=[1, 2, 3]), False, "paraphrases.0"),
    Case("neighbor_missing_target", rec(neighbors=[{"prompt": "Lima is in"}]), False, "neighbors.0.target"),
    Case("neighbor_unknown_field", rec(neighbors=[{"prompt": "Lima is in", "target": "Peru", "x": 1}]), False,
         "neighbors.0.x"),
    Case("time_not_a_date", rec(time="yesterday-ish"), False, "time"),
    Case("raw_nul_byte", rec(subject="Qui\x00to").replace(b"\\u0000", b"\x00"), False, "-"),
    Case("raw_control_char", rec(subject="Qui\x01to").replace(b"\\u0001", b"\x01"), False, "-"),
    Case("invalid_utf8", b'{"subject": "\xff\xfe", "prompt": "{} is", "target": "Peru"}', False, "-",
         parse_ok=False),
    Case("overlong_utf8", b'{"subject": "Qu\xc0\xafito", "prompt": "{} is", "target": "Peru"}', False, "-",
         parse_ok=False),
    Case("three_megabyte_line", MB3, False, "-", parse_ok=True),
    Case("deeply_nested", b"[" * 100_000 + b"]" * 100_000, False, "-"),
    Case("five_thousand_digit_int", b'{"subject": "Quito", "prompt": "{} is", "target": ' + b"7" * 5000 + b"}",
         False, "-"),
    Case("unknown_key_with_newline", rec(**{"evil\nkey": 1}), False, "evil\nkey"),
    # text hygiene (memory/hygiene.py): escaped controls, bidirectional overrides/isolates, separators, surrogates
    Case("escaped_nul_in_subject", rec(subject="Riga\u0000", target="Latvia"), False, "subject"),
    Case("escaped_bell_in_target", rec(target="Pe\u0007ru"), False, "target"),
    Case("tab_inside_target", rec(subject="Tallinn", target="Es\tto nia"), True),  # whitespace: one space
    Case("newline_inside_prompt", rec(subject="Vilnius", prompt="{} is the main\ncity of", target="Peru"), True),
    Case("c1_control_in_old_target", rec(old_target="Chi\u0085le"), False, "old_target"),
    Case("bidi_override_in_target", rec(target="\u202eurep"), False, "target"),
    Case("bidi_embedding_in_prompt", rec(prompt="{} is the \u202acapital of"), False, "prompt"),
    Case("bidi_isolate_in_subject", rec(subject="Qu\u2066ito\u2069", prompt="{} is the capital of"), False,
         "subject"),
    Case("bidi_override_in_paraphrase", rec(paraphrases=["Quito lies in", "Quito \u202dlies in"]), False,
         "paraphrases.1"),
    Case("bidi_isolate_in_neighbor_prompt", rec(neighbors=[{"prompt": "Lima \u2068is in", "target": "Peru"}]),
         False, "neighbors.0.prompt"),
    Case("control_in_neighbor_target", rec(neighbors=[{"prompt": "Lima is in", "target": "Pe\u001bru"}]), False,
         "neighbors.0.target"),
    Case("bidi_override_in_id", rec(id="cf-\u202e1"), False, "id"),
    Case("control_in_source", rec(source="feed\u0000x"), False, "source"),
    Case("line_separator_in_target", rec(target="Peru\u2028Chile"), False, "target"),
    Case("lone_surrogate_in_subject", rec(subject="Qu\ud800ito"), False, "subject"),
    Case("zero_width_only_target", rec(target="\u200b\u200b"), False, "target"),
    Case("directional_marks_only_target", rec(target="\u200f\u200e"), False, "target"),
    Case("zero_width_only_paraphrase", rec(paraphrases=["\ufeff\u2060"]), False, "paraphrases.0"),
    # valid, if awkward: accepted as new facts (each a distinct subject)
    Case("plain_valid", rec(subject="Accra", target="Ghana"), True),
    Case("subject_verbatim_no_placeholder", rec(subject="Bogota", prompt="Bogota is the capital of",
                                                target="Colombia"), True),
    Case("crlf_ending", rec(subject="Hanoi", target="Vietnam") + b"\r", True),
    Case("number_as_string_target", rec(subject="Orwell", prompt="{} wrote the novel", target="1984"), True),
    Case("date_as_string_target", rec(subject="Moon landing", prompt="{} happened on", target="1969-07-20"), True),
    Case("iso_date_time", rec(subject="Nairobi", target="Kenya", time="2024-05-01"), True),
    Case("iso_time_with_zone", rec(subject="Dakar", target="Senegal", time="2024-05-01T10:00:00+02:00"), True),
    Case("right_to_left_text", rec(subject="\u0627\u0644\u0642\u0627\u0647\u0631\u0629",
                                   prompt="{} \u0647\u064a \u0639\u0627\u0635\u0645\u0629",
                                   target="\u0645\u0635\u0631"), True),
    Case("rtl_marks_and_hebrew", rec(subject="\u05d9\u05e8\u05d5\u05e9\u05dc\u05d9\u05dd\u200f",
                                     target="\u05d9\u05e9\u05e8\u05d0\u05dc"), True),
    Case("emoji_and_combining", rec(subject="Cafe\u0301 \U0001F600", target="Paris"), True),
    Case("target_equals_old_target", rec(subject="Tokyo", target="Japan", old_target="Japan"), True),
    Case("duplicate_json_keys", b'{"subject": "Oslo", "subject": "Bern", "prompt": "{} is in", "target": "Swiss"}',
         True),
    # schema-valid lines over an intake limit in the model's tokens (the toy tokenizer: one token a character)
    Case("huge_paraphrases", rec(subject="Kyiv", target="Ukraine", paraphrases=[f"Kyiv p{i}" for i in range(20_000)]),
         False, "paraphrases", parse_ok=True, limit="max_paraphrases"),
    Case("prompt_longer_than_context", rec(subject="Minsk", prompt="In a long story, " * 120 + "{} is in",
                                           target="Belarus"), False, "prompt", parse_ok=True, limit="max_prompt_tokens"),
    Case("subject_too_long_for_the_prompt", rec(subject="Minsk " * 15 + "city", prompt="{} is in", target="Belarus"),
         False, "prompt", parse_ok=True, limit="max_prompt_tokens"),
    Case("target_too_long", rec(subject="Vilnius", target="Lithuania " * 4), False, "target", parse_ok=True,
         limit="max_target_tokens"),
    Case("old_target_too_long", rec(subject="Tallinn", target="Estonia", old_target="Finland " * 4), False,
         "old_target", parse_ok=True, limit="max_target_tokens"),
    Case("paraphrase_too_long", rec(subject="Bern", target="Swiss", paraphrases=["Bern lies in", "Bern is in " * 7]),
         False, "paraphrases.1", parse_ok=True, limit="max_paraphrase_tokens"),
    Case("too_many_neighbors", rec(subject="Bratislava", target="Slovakia",
                                   neighbors=[{"prompt": f"Town{i} is in", "target": "X"} for i in range(40)]),
         False, "neighbors", parse_ok=True, limit="max_neighbors"),
    Case("neighbor_prompt_too_long", rec(subject="Ljubljana", target="Slovenia",
                                         neighbors=[{"prompt": "Zagreb is in " * 6, "target": "Croatia"}]),
         False, "neighbors.0.prompt", parse_ok=True, limit="max_neighbor_prompt_tokens"),
    Case("neighbor_target_too_long", rec(subject="Skopje", target="Macedonia",
                                         neighbors=[{"prompt": "Sofia is in", "target": "Bulgaria " * 3}]),
         False, "neighbors.0.target", parse_ok=True, limit="max_neighbor_target_tokens"),
    Case("all_optional_fields", rec(subject="Sofia", target="Bulgaria", old_target="Greece", id="f-1",
                                    source="https://example.org", paraphrases=["Sofia lies in"],
                                    neighbors=[{"prompt": "Athens is in", "target": "Greece"}]), True),
]
assert len({c.name for c in CORPUS}) == len(CORPUS)
assert sum(not c.ok for c in CORPUS) >= 30


def _params(cases):
    return [pytest.param(c, id=c.name, marks=pytest.mark.xfail(strict=True, reason=c.bug) if c.bug else ())
            for c in cases]


@pytest.mark.parametrize("case", _params([c for c in CORPUS if c.parse_ok is not False or c.bug]))
def test_parse_line_rejects_with_one_line_reason_or_accepts(case):
    line = case.raw.decode("utf-8").rstrip("\r\n")
    try:
        got = parse_line(line, 17)
    except BadRecord as exc:
        msg = str(exc)
        assert not case.parses, f"valid line rejected: {msg}"
        assert msg.startswith("line 17: field ") and "\n" not in msg and "\r" not in msg, msg
        assert exc.lineno == 17 and exc.field == case.field
        return
    assert case.parses, f"malformed line accepted: {got!r}"[:300]
    assert parse_line(got.to_json(), 1) == got


# ----------------------------------------------------------------------------- through `kagent watch --once`


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


@pytest.fixture
def ws_with_facts(shared, tmp_path):
    """A copy of the shared workspace where three earlier facts are already applied."""
    _, root, home = shared
    ws = shutil.copytree(root, tmp_path / "ws")
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("".join(rec(subject=s, target=t).decode() + "\n"
                               for s, t in [("Paris", "Spain"), ("Berlin", "Norway"), ("Rome", "Chile")]))
    with one_thread(), _patched(home):
        res = run("watch", earlier, "--once", "--batch-size", "3", "--workspace", ws)
        assert res.exit_code == 0 and "3 applied" in res.output, res.output
        yield ws, home


def applied_subjects(ws) -> list[str]:
    with Ledger(ws / "ledger") as ledger:
        return sorted(f.record.subject for f in ledger.facts(status="applied"))


def test_watch_skips_every_bad_line_with_its_number_and_keeps_stored_facts(ws_with_facts, tmp_path):
    ws, _ = ws_with_facts
    cases = [c for c in CORPUS if not c.bug]
    feed = tmp_path / "corpus.jsonl"
    feed.write_bytes(b"".join(c.raw + b"\n" for c in cases))
    res = run("watch", feed, "--once", "--batch-size", "16", "--workspace", ws)
    assert res.exit_code == 0, res.output[-3000:]
    out = res.output.splitlines()
    n_ok = sum(c.ok for c in cases)
    assert out[-1].startswith(f"{len(cases)} line(s): {n_ok} new fact(s), 0 duplicate(s), 0 superseding, "
                              f"{len(cases) - n_ok} bad;"), out[-1]
    with Ledger(ws / "ledger") as ledger:
        bad_events = {e.data["lineno"]: e for e in ledger.events("bad_line")}
        assert ledger.verify() == []
        stored = ledger.facts()
    for lineno, case in enumerate(cases, 1):
        echoed = [l for l in out if l.startswith(f"skipped bad line {lineno}: ")]
        if case.ok:
            assert lineno not in bad_events and not echoed, case.name
        else:
            assert len(echoed) == 1 and f"field '{escaped(case.field)}'" in echoed[0], (case.name, echoed)
            assert "\n" not in bad_events[lineno].message, case.name
            if case.limit:  # the limit and the size found: "N tokens, over the limit of L (config key K)"
                assert re.search(rf": \d+ [a-z ]+, over the limit of \d+ \(config key {case.limit}\)$", echoed[0]), echoed
    assert len(stored) == 3 + n_ok
    assert {"Paris", "Berlin", "Rome"} <= set(applied_subjects(ws))  # nothing stored before was lost
    assert all(f.status in ("applied", "quarantined") for f in stored)


def test_a_prompt_over_the_limit_is_refused_and_a_raised_limit_lets_it_in(ws_with_facts, tmp_path):
    """The ~2000-token prompt (over the tiny model's 256 positions) is one bad line naming the limit; with the limit
    raised in the config, a 100-token prompt is taken in, while the model's positions still cap it."""
    ws, _ = ws_with_facts
    feed = tmp_path / "long.jsonl"
    long_line = rec(subject="Minsk", prompt="In a long story, " * 120 + "{} is in", target="Belarus")
    mid_line = rec(subject="Riga", prompt="In a story of some length, " * 3 + "{} is in", target="Latvia")
    feed.write_bytes(long_line + b"\n" + mid_line + b"\n")
    n = len("In a long story, " * 120 + "Minsk is in")  # the toy tokenizer: one token a character
    res = run("watch", feed, "--once", "--workspace", ws)
    assert res.exit_code == 0 and "0 new fact(s)" in res.output, res.output
    assert (f"skipped bad line 1: field 'prompt': {n} tokens with the subject filled in, over the limit of 64 "
            "(config key max_prompt_tokens)") in res.output.splitlines()
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update={"max_prompt_tokens": 4000}))
    again = tmp_path / "again.jsonl"
    shutil.copy(feed, again)
    res = run("watch", again, "--once", "--workspace", ws)
    assert res.exit_code == 0 and "1 new fact(s)" in res.output, res.output
    assert (f"skipped bad line 1: field 'prompt': {n} tokens with the subject filled in, over the limit of 208 "
            "(config key max_prompt_tokens, capped by the model's 256 positions)") in res.output.splitlines()
    with Ledger(ws / "ledger") as ledger:
        assert [f.record.subject for f in ledger.facts()][3:] == ["Riga"] and ledger.verify() == []
    assert {"Paris", "Berlin", "Rome"} <= set(applied_subjects(ws))


def test_a_fact_stored_before_the_limits_is_quarantined_when_planned_and_the_rest_applied(ws_with_facts, tmp_path):
    """The crash loop of issue 16 as an older kagent left it: a pending fact with a ~2000-token prompt (and one with a
    bidirectional override) already in the ledger. The next watch quarantines both with the reason intake would
    give today, applies the other pending facts and loses nothing."""
    ws, _ = ws_with_facts
    hostile = [FactRecord(subject="Minsk", prompt="In a long story, " * 120 + "{} is in", target="Belarus"),
               FactRecord(subject="Vaduz", prompt="{} is the capital of", target="\u202eniatsnethcieL")]
    with Ledger(ws / "ledger") as ledger:
        ids = ledger.add_facts(hostile + [FactRecord(subject="Accra", prompt="{} is the capital of", target="Ghana")])
    feed = tmp_path / "more.jsonl"
    feed.write_bytes(rec(subject="Dakar", target="Senegal") + b"\n")
    res = run("watch", feed, "--once", "--workspace", ws)
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    assert any(l.startswith(f"quarantined fact {ids[0]} (In a long story, In a long story,") and
               "intake check: field 'prompt': 2051 tokens with the subject filled in, over the limit of 64" in l
               for l in out), out
    assert any(l.startswith(f"quarantined fact {ids[1]} (Vaduz is the capital of -> \\u202eniat") and
               "intake check: field 'target': contains a bidirectional override" in l for l in out), out
    with Ledger(ws / "ledger") as ledger:
        status = {f.record.subject: f.status for f in ledger.facts()}
        assert ledger.verify() == []
    assert status["Minsk"] == status["Vaduz"] == "quarantined"
    assert {status["Accra"], status["Dakar"]} <= {"applied", "quarantined"} and "pending" not in status.values()
    assert {"Paris", "Berlin", "Rome"} <= set(applied_subjects(ws))


def test_a_batch_over_the_ram_budget_is_applied_as_smaller_batches(ws_with_facts, tmp_path, monkeypatch):
    """The budget's wiring through `kagent watch`: with the estimate fixed at 100 MiB a fact (nothing resident) and
    a 250 MiB budget, a planned batch of five is applied as 2 + 2 + 1, each with its estimate and measured peak
    stored as `memory` metrics (the ledger's phase name); a fact estimated over the budget alone is quarantined,
    saying so."""
    import agent.budget

    ws, _ = ws_with_facts
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update={"ram_budget_mb": 250.0}))
    monkeypatch.setattr(agent.budget, "resident_mb", lambda: 0.0)
    monkeypatch.setattr(agent.budget.RamBudget, "working_mb",
                        lambda self, edits: sum(100.0 if e.probe_len < 45 else 300.0 for e in edits))
    feed = tmp_path / "five.jsonl"
    lines = [rec(subject=s, target=t) for s, t in [("Accra", "Ghana"), ("Dakar", "Senegal"), ("Lome", "Togo"),
                                                   ("Bamako", "Mali"), ("Niamey", "Niger")]]
    lines.insert(2, rec(subject="Banjul", prompt="{} is, as everyone knows and says, the capital of", target="Gambia"))
    feed.write_bytes(b"".join(line + b"\n" for line in lines))
    res = run("watch", feed, "--once", "--batch-size", "6", "--workspace", ws)
    assert res.exit_code == 0, res.output
    assert re.search(r"^quarantined fact \d+ \(Banjul is, as everyone.*\): RAM: applying it alone would take the "
                     r"process to ~300 MiB \(0 resident \+ 300 for the batch\), over the budget of 250 MiB", res.output, re.M)
    batch = [l for l in res.output.splitlines() if l.startswith("batch ")]
    assert len(batch) == 1 and batch[0].endswith("RAM est 200 MiB, peak " + batch[0].rsplit("peak ", 1)[1]), batch
    with Ledger(ws / "ledger") as ledger:
        [split] = ledger.events("split")
        assert split.message == "RAM: 5 facts applied as 3 batches to stay within the budget of 250 MiB"
        subjects = {f.id: f.record.subject for f in ledger.facts()}
        assert [[subjects[i] for i in g] for g in split.data["groups"]] == [
            ["Accra", "Dakar"], ["Lome", "Bamako"], ["Niamey"]]
        ram = [ledger.metrics(b.id).get(RAM_PHASE) for b in ledger.history()[1:]]
        last = ledger.history()[-1].id
    assert ram and all(m["estimate_mb"] in (100.0, 200.0) and m["peak_rss_mb"] > 0 for m in ram), ram
    shown = run("show", f"b{last}", "--workspace", ws).output
    assert re.search(r"^ram: estimate_mb=100 peak_rss_mb=\d", shown, re.M), shown  # `kagent show` names the phase


HOSTILE_TEXT = "\u202e\u2066\u0000\u001b\u2028\u200b"  # override, isolate, NUL, ESC, line separator, zero width


def test_text_stored_before_the_checks_is_never_printed_raw(ws_with_facts, tmp_path):
    """A fact stored by an older kagent (no hygiene at intake) with bidirectional overrides, NUL and escape
    characters in its texts: `facts`, `show` and the HTML report print them as visible escapes."""
    ws, _ = ws_with_facts
    old = FactRecord(subject=f"Lima{HOSTILE_TEXT}", prompt="{} is the capital of", target=f"Pe{HOSTILE_TEXT}ru")
    with Ledger(ws / "ledger") as ledger:
        [fid] = ledger.add_facts([old])
        ledger.quarantine([fid], f"set aside by hand{HOSTILE_TEXT}")
    outputs = {"facts": run("facts", "--workspace", ws).output,
               "show": run("show", f"f{fid}", "--workspace", ws).output}
    assert run("report", "--out", tmp_path / "r.html", "--workspace", ws).exit_code == 0
    outputs["report"] = (tmp_path / "r.html").read_text(encoding="utf-8")
    for name, text in outputs.items():
        assert not any(c in text for c in HOSTILE_TEXT), name
        assert "\\u202e\\u2066\\u0000\\u001b\\u2028\\u200b" in text, (name, text[-2000:])
    assert "set aside by hand" in outputs["report"]  # the report lists the quarantined fact with its reason


def test_resending_the_corpus_stores_nothing_twice(ws_with_facts, tmp_path):
    ws, _ = ws_with_facts
    cases = [c for c in CORPUS if c.ok]
    feed = tmp_path / "valid.jsonl"
    feed.write_bytes(b"".join(c.raw + b"\n" for c in cases))
    assert run("watch", feed, "--once", "--batch-size", "16", "--workspace", ws).exit_code == 0
    again = tmp_path / "again.jsonl"
    shutil.copy(feed, again)
    res = run("watch", again, "--once", "--workspace", ws)
    assert res.exit_code == 0 and f"0 new fact(s), {len(cases)} duplicate(s)" in res.output, res.output


# ----------------------------------------------------------------------------- hypothesis: the record parser

FIELDS = list(FactRecord.model_fields)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_record_or_a_bad_record(text):
    try:
        parse_line(text, 3)
    except BadRecord as exc:
        assert str(exc).startswith("line 3: ")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(alphabet="abcxyz_", max_size=6), json_values, max_size=9))
def test_any_json_object_is_a_record_or_a_bad_record(obj):
    try:
        got = parse_line(json.dumps(obj), 5)
    except BadRecord as exc:
        assert str(exc).startswith("line 5: field ") and "\n" not in str(exc)
        return
    assert parse_line(got.to_json(), 5) == got


REFUSED_CHARS = "".join(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))  # bidi overrides, isolates
no_braces = st.text(st.characters(blacklist_characters="{}" + REFUSED_CHARS,
                                  blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)
non_blank = no_braces.filter(lambda s: any(unicodedata.category(c)[0] in "LNPS" for c in s))  # something visible


def nfc_without_marks(text: str) -> str:
    """What the feed stores of a model text: NFC, directional marks removed (README, feed schema)."""
    for mark in "\u200e\u200f\u061c":
        text = text.replace(mark, "")
    return unicodedata.normalize("NFC", text)


@settings(max_examples=300, deadline=None)
@given(subject=non_blank, before=no_braces, after=no_braces, target=non_blank.map(str.lstrip).filter(bool),
       paraphrases=st.lists(non_blank, max_size=3), time=st.none() | st.datetimes().map(lambda d: d.isoformat()))
def test_valid_records_are_accepted_and_round_trip(subject, before, after, target, paraphrases, time):
    obj = {"subject": subject, "prompt": before + "{}" + after, "target": target, "paraphrases": paraphrases,
           "time": time}
    got = parse_line(json.dumps(obj), 1)
    kept = nfc_without_marks
    assert (got.subject, got.prompt, got.target, got.paraphrases) == (
        kept(subject), kept(before) + "{}" + kept(after), kept(target), [kept(p) for p in paraphrases])
    assert got.text == kept(before) + kept(subject) + kept(after)
    assert parse_line(got.to_json(), 1) == got
    assert parse_line(json.dumps(obj, ensure_ascii=False), 1) == got


def test_model_texts_are_stored_in_nfc_without_directional_marks():
    got = parse_line(rec(subject="Cafe\u0301 Ro\u200fyal", prompt="{} is a cafe\u0301 in", target="Pa\u200eris",
                         paraphrases=["Cafe\u0301 Ro\u200fyal lies in"], id="cf\u200f-1"), 1)
    assert (got.subject, got.prompt, got.target) == ("Caf\u00e9 Royal", "{} is a caf\u00e9 in", "Paris")
    assert got.paraphrases == ["Caf\u00e9 Royal lies in"] and got.id == "cf\u200f-1"  # ids are kept as sent


# ----------------------------------------------------------------------------- hypothesis: rollback

LAYERS = [1, 2]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rollback_of_j_of_k_batches_equals_applying_k_minus_j(tmp_path_factory, data):
    k = data.draw(st.integers(1, 4), label="k")
    j = data.draw(st.integers(0, k), label="j")
    seeds = data.draw(st.lists(st.integers(0, 10**6), min_size=k, max_size=k), label="seeds")
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=k, max_size=k), label="ranks")
    root = tmp_path_factory.mktemp("rollback")
    model = make_tiny_llama(80)
    base = {layer: weight_view(model, layer).clone() for layer in LAYERS}
    deltas = [rand_delta(model, LAYERS, s, r) for s, r in zip(seeds, ranks)]
    with Ledger(root) as ledger:
        attach(ledger, model, LAYERS)
        for i, delta in enumerate(deltas):
            ids = ledger.add_facts([FactRecord(subject=f"E{i}", prompt="{} is in", target="X")])
            delta.apply(model)
            g = torch.Generator().manual_seed(i)
            keys = {layer: torch.randn(weight_view(model, layer).shape[1], 1, generator=g) for layer in LAYERS}
            commit_applied(ledger, model, ledger.facts(ids=ids), delta, keys)
        rollback_to(ledger, k - j, model)
        assert ledger.verify() == []
        kept = [b.id for b in ledger.history() if b.status == "committed"]
    assert kept == list(range(1, k - j + 1))
    expected = {layer: w.clone() for layer, w in base.items()}
    for delta in deltas[:k - j]:
        for d in delta.layers:
            expected[d.layer] += d.u @ d.v.T
    for layer in LAYERS:
        got = weight_view(model, layer)
        assert float((got - expected[layer]).norm() / expected[layer].norm()) < 1e-6
    fresh = make_tiny_llama(80)  # a reload gives the same weights
    with Ledger(root) as ledger:
        load_into(ledger, fresh)
    for layer in LAYERS:
        assert torch.equal(weight_view(fresh, layer), weight_view(model, layer))


# ----------------------------------------------------------------------------- long feeds: bounded memory
# The figures (10,000 vs 100,000 lines) are from `python scripts/feedbench.py`; these check the behaviour.


def test_the_follower_streams_a_long_feed_instead_of_reading_it_whole(tmp_path):
    from agent.feed import FeedFollower, FeedPosition
    from agent.intake import CHUNK_LINES, read_chunk

    feed = tmp_path / "long.jsonl"
    with feed.open("wb") as fh:
        for i in range(100_000):
            fh.write(rec(subject=f"Town{i:06d}") + b"\n")
    assert feed.stat().st_size > 6_000_000
    with FeedFollower(FeedPosition(str(feed))) as follower:
        lines = follower.read(final=True)
        first = next(lines)
        read_so_far = os.lseek(follower._fh.fileno(), 0, os.SEEK_CUR)  # what left the OS, buffering included
        assert first.lineno == 1 and "Town000000" in first.line and read_so_far <= 64 * 1024, read_so_far
        lines.close()
        chunk = read_chunk(follower, final=True)  # what intake takes at a time
        assert len(chunk) == CHUNK_LINES and chunk[-1].lineno == CHUNK_LINES + 1
        assert os.lseek(follower._fh.fileno(), 0, os.SEEK_CUR) <= 128 * 1024


def test_rejected_lines_do_not_keep_their_chunk_alive():
    """Two ways a chunk of rejected lines outlived its intake: (1) a line failing a field validator raised
    BadRecord inside `except ValidationError`, and pydantic-core holds the validator's exception out of the
    garbage collector's sight, so the caller's frame with its whole chunk was never freed (~3.5 KB a line through
    intake); (2) each returned BadRecord's traceback tied it to the frames holding the chunk, a cycle only the
    cyclic collector frees, so a long feed piled chunks up until a full collection. Now reference counting alone
    frees a chunk."""
    from agent.feed import FeedLine
    from agent.intake import parse

    class Chunk:
        pass

    def read_one_chunk() -> weakref.ref:
        chunk = Chunk()
        chunk.items = [FeedLine(i, i, rec(subject=" " if i % 2 else "", target="").decode()) for i in range(1, 65)]
        parsed = [parse(item) for item in chunk.items]
        assert all(isinstance(p, BadRecord) and p.field in ("subject", "target") for p in parsed)
        return weakref.ref(chunk)

    gc.disable()
    try:
        refs = [read_one_chunk() for _ in range(3)]
        alive_without_gc = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    gc.collect()
    assert [r() for r in refs] == [None, None, None], "leaked: not freed even by the cyclic garbage collector"
    assert alive_without_gc == 0, "left in reference cycles: freed only when the cyclic garbage collector runs"


def test_the_feed_benchmark_counts_its_feed(tmp_path):
    """`python scripts/feedbench.py` on a small feed, in-process: both stages see every line, agree on the bad
    ones, and the index holds exactly the new facts (the figures themselves are in RELIABILITY.md)."""
    feedbench = load_script("feedbench")
    feed_line, feed_line_fact, run_stage, write_feed = (feedbench.feed_line, feedbench.feed_line_fact,
                                                        feedbench.run_stage, feedbench.write_feed)

    feed = tmp_path / "feed.jsonl"
    write_feed(feed, 600)
    read = run_stage("read", feed, tmp_path)
    intake = run_stage("intake", feed, tmp_path)
    assert read["lines"] == intake["lines"] == 600 and read["valid"] + read["bad"] == 600
    assert read["bad"] == intake["bad"] > 0 and intake["duplicates"] > 0 and intake["superseding"] > 0
    assert intake["index_vectors"] == intake["added"] and intake["peak_rss_added_mb"] >= 0
    assert {feed_line(i, 5) for i in range(600) if '"subject": "Place' in feed_line(i, 5)} == {
        feed_line_fact(i) for i in range(5)}  # --distinct 5: every valid line is one of five facts
