"""Build the shipped probe sets: known facts (evaluators/data/known_facts.jsonl) and the guard's probe facts.

A probe is a CounterFact fact the *unedited* model gets right: greedy decoding after the prompt
starts with " " + the true answer (every answer token is the argmax given the answer prefix;
this implies the first-token check). Candidates come from the validation file only, whose case
ids never appear in the train file the benchmark edits; per val record we try its edit prompt,
its rephrase prompt (both answered by ground_truth; prompts over MAX_PROMPT_CHARS skipped) and its locality prompt (answered by
locality_ground_truth, subject recovered by matching CounterFact's prompt templates).
Candidates whose prompt mentions any train subject are dropped, so editing train records cannot
legitimately change a probe. The first `--keep` hits in val order are written, one JSON object a
line: {"prompt", "subject", "target", "case_id", "source"}; a sibling known_facts.meta.json
records how many records were scanned and the yield.

Run: python scripts/build_probes.py --val ../shared/data/counterfact/counterfact-val.json \
         --train ../shared/data/counterfact/counterfact-train.json

`--set damage` builds the guard's probe facts (evaluators/data/probe_facts.jsonl, the damage measure of
evaluators/probes/damage.py): every known fact above, plus the same scan over the CounterFact train records in
RESERVED_TRAIN (positions in the train file; no benchmark edits them, evaluators.probes.facts.reserved) and over
the zsRE file's questions (src and rephrase, answered by answers[0]); candidates mentioning a subject of
the other train records are dropped here too. Each fact carries the unedited model's margin.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import click
import torch
from pydantic import BaseModel

from evaluators.counterfact import CounterFactRecord, load_counterfact
from evaluators.probes.damage import fact_margins
from evaluators.probes.facts import CF_TRAIN, CF_VAL, PROBE_FACTS_FILE, ZSRE, ProbeFact
from evaluators.scoring import greedy_matches
from evaluators.zsre import ZsreRecord, load_zsre

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "counterfact"  # shared/ beside the repository
OUT_DIR = REPO / "evaluators" / "data"
DEFAULT_ZSRE = REPO.parent / "shared" / "data" / "zsre" / "zsre-train-1k.json"
RESERVED_TRAIN = range(7500, 10000)  # CounterFact train positions scanned for probe facts (never edited)
MAX_PROMPT_CHARS = 80  # longer (generation-style) rephrase prompts are skipped: slow to score, rarely answered


class Probe(BaseModel):
    prompt: str  # the prompt with the subject written in
    subject: str  # the entity the fact is about
    target: str  # the answer the unedited model gives (no leading space)
    case_id: int  # the CounterFact val record the prompt comes from
    source: str  # which prompt of that record: "prompt", "rephrase" or "locality"


def template_matchers(records: Iterable[CounterFactRecord]) -> list[re.Pattern[str]]:
    """Regexes for every CounterFact prompt template, most specific (longest) first."""
    templates = sorted({r.template() for r in records}, key=len, reverse=True)
    return [re.compile("^" + re.escape(t).replace(r"\{\}", "(.+?)") + "$") for t in templates]


def recover_subject(prompt: str, matchers: Sequence[re.Pattern[str]]) -> str | None:
    for m in matchers:
        hit = m.match(prompt)
        if hit:
            return hit.group(1)
    return None


def candidates(val: Sequence[CounterFactRecord], matchers: Sequence[re.Pattern[str]]) -> list[Probe]:
    """Every val prompt with its true answer, in val order, unique by prompt."""
    out: list[Probe] = []
    seen: set[str] = set()
    for r in val:
        loc_subject = recover_subject(r.locality_prompt, matchers)
        rows = [(r.prompt, r.subject, r.ground_truth, "prompt"), (r.rephrase_prompt, r.subject, r.ground_truth, "rephrase")]
        if loc_subject:
            rows.append((r.locality_prompt, loc_subject, r.locality_ground_truth, "locality"))
        for prompt, subject, target, source in rows:
            if prompt not in seen and subject in prompt and len(prompt) <= MAX_PROMPT_CHARS:
                seen.add(prompt)
                out.append(Probe(prompt=prompt, subject=subject, target=target, case_id=r.case_id, source=source))
    return out


def subject_index(subjects: Iterable[str]) -> dict[str, list[str]]:
    """Subjects keyed by their first word (run of word characters)."""
    index: dict[str, list[str]] = {}
    for s in subjects:
        first = re.match(r"\w+", s)
        if first:
            index.setdefault(first.group(0), []).append(s)
    return index


def mentions_subject(prompt: str, index: dict[str, list[str]]) -> bool:
    """True when one of the indexed subjects occurs in `prompt` as whole words."""
    for word in re.finditer(r"\b\w+", prompt):
        rest = prompt[word.start():]
        for s in index.get(word.group(0), ()):
            if rest.startswith(s) and not re.match(r"\w", rest[len(s): len(s) + 1]):
                return True
    return False


def drop_train_subjects(probes: Sequence[Probe], train: Sequence[CounterFactRecord]) -> list[Probe]:
    """Candidates that mention no subject of the train file (whose records the benchmark edits)."""
    index = subject_index({r.subject for r in train})
    kept = [p for p in probes if not mentions_subject(p.prompt, index)]
    log.info("dropped %d of %d candidates mentioning a train subject", len(probes) - len(kept), len(probes))
    return kept


def build(model: torch.nn.Module, tok, val: Sequence[CounterFactRecord], train: Sequence[CounterFactRecord],
          keep: int, batch_size: int) -> tuple[list[Probe], dict]:
    """The first `keep` candidates the model gets right, and a summary of the scan."""
    matchers = template_matchers(list(val) + list(train))
    pool = drop_train_subjects(candidates(val, matchers), train)
    right = greedy_matches(model, tok, [p.prompt for p in pool], [p.target for p in pool],
                           batch_size=batch_size, progress=True)
    hits = [p for p, ok in zip(pool, right.tolist()) if ok]
    kept = hits[:keep]
    summary = {
        "val_records_scanned": len(val), "candidate_prompts": len(pool), "correct": len(hits),
        "yield": round(len(hits) / max(len(pool), 1), 4), "kept": len(kept),
        "correct_by_source": dict(Counter(p.source for p in hits)),
        "kept_by_source": dict(Counter(p.source for p in kept)),
        "criterion": "greedy continuation starts with ' ' + target (all answer tokens argmax, teacher-forced)",
    }
    return kept, summary


def zsre_candidates(records: Sequence[ZsreRecord], index: dict[str, list[str]]) -> list[ProbeFact]:
    """zsRE questions (src, rephrase) answered by the record's first answer, unique by prompt, none mentioning an
    indexed (edited) subject."""
    out, seen = [], set()
    for i, r in enumerate(records):
        answer = r.answers[0] if r.answers else ""
        for prompt, source in ((r.src, "src"), (r.rephrase, "rephrase")):
            if answer and prompt not in seen and len(prompt) <= MAX_PROMPT_CHARS and not mentions_subject(prompt, index):
                seen.add(prompt)
                out.append(ProbeFact(prompt=prompt, subject=r.subject, target=answer, dataset=ZSRE, record=i,
                                     source=source, margin=0.0))
    return out


def as_probe_facts(probes: Iterable[Probe], dataset: str) -> list[ProbeFact]:
    return [ProbeFact(prompt=p.prompt, subject=p.subject, target=p.target, dataset=dataset, record=p.case_id,
                      source=p.source, margin=0.0) for p in probes]


def damage_pool(val: Sequence[CounterFactRecord], train: Sequence[CounterFactRecord],
                zsre: Sequence[ZsreRecord]) -> tuple[list[ProbeFact], list[ProbeFact]]:
    """(the known facts as probe facts, the unscanned candidates of the reserved train records and zsRE)."""
    reserved = [train[i] for i in RESERVED_TRAIN if i < len(train)]
    edited = [r for i, r in enumerate(train) if i not in RESERVED_TRAIN]
    index = subject_index({r.subject for r in edited})
    matchers = template_matchers(list(val) + list(train))
    kept = [p for p in candidates(reserved, matchers) if not mentions_subject(p.prompt, index)]
    known = as_probe_facts(load_known_probes(), CF_VAL)
    seen = {f.prompt for f in known}  # a locality prompt can recur in other records
    pool = [f for f in as_probe_facts(kept, CF_TRAIN) + zsre_candidates(zsre, index) if f.prompt not in seen]
    return known, pool


def load_known_probes() -> list[Probe]:
    return [Probe.model_validate_json(line) for line in (OUT_DIR / "known_facts.jsonl").read_text().splitlines()
            if line.strip()]


def build_damage(model: torch.nn.Module, tok, val: Sequence[CounterFactRecord], train: Sequence[CounterFactRecord],
                 zsre: Sequence[ZsreRecord], batch_size: int) -> tuple[list[ProbeFact], dict]:
    """The known facts and every reserved-train / zsRE candidate the model answers, each with its margin."""
    known, pool = damage_pool(val, train, zsre)
    right = greedy_matches(model, tok, [p.prompt for p in pool], [p.target for p in pool],
                           batch_size=batch_size, progress=True)
    facts = known + [p for p, ok in zip(pool, right.tolist()) if ok]
    margins = fact_margins(model, tok, facts).tolist()
    facts = [f.model_copy(update={"margin": round(m, 4)}) for f, m in zip(facts, margins)]
    summary = {"reserved_train_positions": [RESERVED_TRAIN.start, RESERVED_TRAIN.stop - 1],
               "candidate_prompts": len(pool), "known_facts": len(known), "kept": len(facts),
               "kept_by_dataset": dict(Counter(f.dataset for f in facts)),
               "kept_by_source": dict(Counter(f"{f.dataset}/{f.source}" for f in facts)),
               "min_margin": min(margins), "criterion": "greedy continuation starts with ' ' + target",
               "zsre_candidates": sum(f.dataset == ZSRE for f in pool)}
    return facts, summary


def write_damage(facts: Sequence[ProbeFact], summary: dict, out_dir: Path) -> Path:
    path = out_dir / PROBE_FACTS_FILE
    path.write_text("".join(f.model_dump_json() + "\n" for f in facts), encoding="utf-8")
    (out_dir / "probe_facts.meta.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def write(probes: Sequence[Probe], summary: dict, out_dir: Path) -> Path:
    path = out_dir / "known_facts.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in probes), encoding="utf-8")
    (out_dir / "known_facts.meta.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


@click.command()
@click.option("--set", "which", type=click.Choice(["known", "damage"]), default="known", show_default=True,
              help="known facts, or the guard's probe facts (damage measure)")
@click.option("--val", "val_path", type=click.Path(exists=True, path_type=Path),
              default=DEFAULT_DATA / "counterfact-val.json", show_default=True)
@click.option("--train", "train_path", type=click.Path(exists=True, path_type=Path),
              default=DEFAULT_DATA / "counterfact-train.json", show_default=True)
@click.option("--zsre", "zsre_path", type=click.Path(exists=True, path_type=Path), default=DEFAULT_ZSRE,
              show_default=True, help="zsRE file scanned by --set damage")
@click.option("--model", "model_name", default=None, help="model to probe (default: the embedded SmolLM2)")
@click.option("--keep", default=200, show_default=True, help="known facts to keep (first hits in val order)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=OUT_DIR, show_default=True)
def main(which: str, val_path: Path, train_path: Path, zsre_path: Path, model_name: str | None, keep: int,
         batch_size: int, out_dir: Path) -> None:
    """Scan the data for facts the base model gets right and write a probe set."""
    from editors.models import DEFAULT_MODEL, load_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_model(model_name or DEFAULT_MODEL)
    val, train = load_counterfact(val_path), load_counterfact(train_path)
    if which == "damage":
        facts, summary = build_damage(loaded.model, loaded.tok, val, train, load_zsre(zsre_path), batch_size)
        summary["model"] = loaded.name
        path = write_damage(facts, summary, out_dir)
    else:
        facts, summary = build(loaded.model, loaded.tok, val, train, keep, batch_size)
        summary["model"] = loaded.name
        path = write(facts, summary, out_dir)
    log.info("wrote %d probe facts to %s: %s", len(facts), path, json.dumps(summary))


if __name__ == "__main__":
    main()
