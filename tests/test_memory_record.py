"""Fact records: the feed schema, one-line errors naming line and field, template and dedup keys."""
from __future__ import annotations

import json

import pytest

from memory.record import BadRecord, FactRecord, parse_line

GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is", "target": "English",
        "old_target": "French", "paraphrases": ["Danielle Darrieux spoke"],
        "neighbors": [{"prompt": "The mother tongue of Jean Gabin is", "target": "French"}],
        "id": "cf-0", "source": "counterfact", "time": "2024-05-01T12:00:00Z"}


def line(**changes) -> str:
    data = {k: v for k, v in (GOOD | changes).items() if v is not ...}
    return json.dumps(data)


def test_full_record_parses():
    rec = parse_line(line(), 1)
    assert rec.template == "The mother tongue of {} is"
    assert rec.relation == "The mother tongue of is"
    assert rec.text == GOOD["prompt"]
    assert rec.time.year == 2024 and rec.neighbors[0].target == "French"


def test_placeholder_prompt_and_minimal_record():
    rec = parse_line(json.dumps({"subject": "Rome", "prompt": "{} is the capital of", "target": "Italy"}), 3)
    assert rec.template == "{} is the capital of" and rec.paraphrases == [] and rec.time is None


def test_to_request_builds_editor_request():
    req = parse_line(line(), 1).to_request()
    assert (req.prompt, req.subject, req.target) == ("The mother tongue of {} is", "Danielle Darrieux", "English")


def test_keys_are_normalised():
    a = FactRecord(subject="Rome ", prompt="{}  is the capital of", target="Italy")
    b = FactRecord(subject="rome", prompt="rome IS the  capital of", target="italy")
    assert a.key == b.key and a.relation_key == b.relation_key


@pytest.mark.parametrize("text, field, reason", [
    (line(subject="   "), "subject", "non-empty"),
    (line(target=""), "target", "non-empty"),
    (line(target=" English"), "target", "whitespace"),
    (line(prompt="The mother tongue of her is"), "prompt", "neither the subject"),
    (line(prompt="{} and {} speak"), "prompt", "placeholders"),
    (line(colour="red"), "colour", "unknown field"),
    (line(subject=...), "subject", "required"),
    (line(time="yesterday"), "time", "datetime"),
    (line(neighbors=[{"prompt": "x"}]), "neighbors.0.target", "required"),
    (line(paraphrases=["ok", " "]), "paraphrases", "empty"),
    ('{"subject": "A", ', "-", "not valid JSON"),
    ("[1, 2]", "-", "JSON object"),
])
def test_bad_records_give_one_line_errors(text, field, reason):
    with pytest.raises(BadRecord) as exc:
        parse_line(text, 17)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"line 17: field '{field}'")
    assert reason.lower() in msg.lower()
    assert (exc.value.lineno, exc.value.field) == (17, field)
