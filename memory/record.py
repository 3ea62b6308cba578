"""The fact record: one line of the fact feed, validated, plus the keys used to deduplicate it.

A feed is JSON Lines; each object has exactly the fields of `FactRecord` (unknown fields are
an error). `parse_line` turns one line into a record or raises `BadRecord` whose message is a
single line naming the line number, the field and the reason; it refuses control, bidirectional
and invisible-only text and normalises the texts the model reads (memory/hygiene.py). Records read
back from the ledger are not re-checked, so facts stored before a check existed still load.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memory.hygiene import normalise_record, record_problem

PLACEHOLDER = "{}"


class BadRecord(ValueError):
    """A feed line that is not a valid fact; str() is one line: line number, field, reason."""

    def __init__(self, lineno: int, field: str, reason: str):
        self.lineno = lineno  # 1-based line number in the feed
        self.field = field  # offending field ("-" when the line is not a JSON object)
        self.reason = reason  # what is wrong, one line
        super().__init__(f"line {lineno}: field '{_one_line(field)}': {_one_line(reason)}")


def _one_line(text: str) -> str:
    """Control characters (newlines included) escaped, so an error message stays on one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def normalise(text: str) -> str:
    """Case-folded text with runs of whitespace collapsed; used for duplicate detection."""
    return " ".join(text.split()).casefold()  # str.split's whitespace is re's \s (both Py_UNICODE_ISSPACE)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string (not only whitespace)")
    return value


class Neighbor(BaseModel):
    """A prompt about a different subject whose answer must not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str  # full prompt text (no placeholder)
    target: str  # answer the model must keep giving

    _check = field_validator("prompt", "target")(_non_blank)


class FactRecord(BaseModel):
    """One fact update: `subject` + relation (`prompt`) now has object `target`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str  # the entity edited, e.g. "Danielle Darrieux"
    prompt: str  # relation prompt holding the subject verbatim or exactly one "{}" placeholder
    target: str  # new object, no leading space, e.g. "English"
    old_target: str | None = None  # object the model is believed to give today, if known
    paraphrases: list[str] = Field(default_factory=list)  # other prompts for the same fact (generalisation probes)
    neighbors: list[Neighbor] = Field(default_factory=list)  # unrelated prompts whose answers must stay (locality probes)
    aliases: list[str] = Field(default_factory=list)  # other names of the subject ("the Big Apple"): they key its slot
    id: str | None = None  # the source's id for the fact, if any
    source: str | None = None  # where the fact came from (URL, feed name)
    time: datetime | None = None  # ISO-8601 time the fact became true / was published

    _check = field_validator("subject", "prompt", "target")(_non_blank)

    @field_validator("paraphrases")
    @classmethod
    def _paraphrases_non_blank(cls, value: list[str]) -> list[str]:
        for i, p in enumerate(value):
            if not p.strip():
                raise ValueError(f"paraphrase {i} is empty")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases_names(cls, value: list[str]) -> list[str]:
        for i, a in enumerate(value):
            if not a.strip() or a != a.strip():
                raise ValueError(f"alias {i} is empty or starts or ends with whitespace")
            if PLACEHOLDER in a:
                raise ValueError(f"alias {i} holds a '{{}}' placeholder; an alias is a name")
        return value

    @field_validator("target")
    @classmethod
    def _no_leading_space(cls, value: str) -> str:
        if value != value.lstrip():
            raise ValueError("must not start with whitespace (the space before the object is added by the editor)")
        return value

    @model_validator(mode="after")
    def _prompt_holds_subject(self) -> "FactRecord":
        n = self.prompt.count(PLACEHOLDER)
        if n > 1:
            raise ValueError(f"prompt: has {n} '{{}}' placeholders; exactly one is allowed")
        if n == 0 and self.subject not in self.prompt:
            raise ValueError("prompt: contains neither the subject verbatim nor a '{}' placeholder")
        return self

    @property
    def template(self) -> str:
        """The prompt with "{}" where the subject goes (first occurrence replaced)."""
        if PLACEHOLDER in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, PLACEHOLDER, 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace(PLACEHOLDER, self.subject)

    @property
    def relation(self) -> str:
        """The relation text: template with the subject removed (what the fact index embeds)."""
        return re.sub(r"\s+", " ", self.template.replace(PLACEHOLDER, " ")).strip()

    @property
    def key(self) -> tuple[str, str, str]:
        """Normalised (subject, relation template, target): equal keys mean exact duplicates."""
        return normalise(self.subject), normalise(self.template), normalise(self.target)

    @property
    def relation_key(self) -> tuple[str, str]:
        """Normalised (subject, relation template): equal keys with different targets supersede."""
        return normalise(self.subject), normalise(self.template)

    def to_request(self) -> Any:
        """The editor's EditRequest for this fact (imported lazily: the editor core is optional here)."""
        from editors.core import EditRequest

        return EditRequest(prompt=self.template, subject=self.subject, target=self.target)

    def paraphrase_texts(self) -> list[str]:
        """The paraphrases with the subject filled in where they hold a placeholder."""
        return [p.replace(PLACEHOLDER, self.subject, 1) for p in self.paraphrases]

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=False)


@dataclass(frozen=True)
class StoredFact:
    """A fact as the ledger holds it."""

    id: int  # ledger fact id (primary key)
    record: FactRecord  # the fact itself
    status: str  # pending | applied | superseded | dropped | rolled_back | quarantined
    batch_id: int | None  # committed batch holding it (when applied / superseded / rolled back)
    reason: str | None  # why its status is what it is (for dropped / rolled back / quarantined)
    superseded_by: int | None  # id of the newer fact replacing it, if any
    tier: str | None = None  # applied facts: "memory" (an entity-memory slot answers it) or "weights" (the weights do)


def _field_of(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
    if loc:
        return ".".join(loc)
    msg = str(err.get("msg", ""))
    m = re.search(r"Value error, (\w+):", msg)
    return m.group(1) if m else "-"


def _reason_of(err: dict) -> str:
    msg = str(err.get("msg", "invalid"))
    msg = re.sub(r"^Value error, (\w+: )?", "", msg)
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (allowed: " + ", ".join(FactRecord.model_fields) + ")"
    return " ".join(msg.split())


def parse_line(line: str, lineno: int) -> FactRecord:
    """Parse one feed line into a FactRecord, or raise BadRecord (one-line message)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord(lineno, "-", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise BadRecord(lineno, "-", "not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise BadRecord(lineno, "-", f"not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadRecord(lineno, "-", f"expected a JSON object, got {type(data).__name__}")
    problem = record_problem(data)
    if problem:
        raise BadRecord(lineno, *problem)
    try:
        return FactRecord.model_validate(normalise_record(data))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
    # Raised here, not in the except block, so the BadRecord does not keep the ValidationError as its context:
    # pydantic-core holds a validator's ValueError (whose traceback reaches the caller's frames) where the garbage
    # collector cannot see it, and that cycle, with the caller's feed chunk, would never be freed.
    first = errors[0]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise BadRecord(lineno, _field_of(first), _reason_of(first) + more)
