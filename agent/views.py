"""Read-only views of a workspace for the CLI: history rows, batch and fact details, status, report rows.

These read the ledger only (no model), so they work while another process holds the write lock; `check_rows`
alone asks a model (the one `kagent check` loaded). Every text that came from a feed, a reason or an event passes
through `memory.hygiene.shown`, so invisible and text-moving characters (bidirectional overrides, NUL, ...) are
printed as visible escapes, for facts stored before the feed refused them too.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.report import EventRow, FactRow, ReportData, ReportRow, lane
from agent.workspace import Baseline
from evaluators.probes import same_subject
from evaluators.probes.suite import TOOK_PROBE
from memory.ledger import BatchInfo, Event, Ledger
from memory.hygiene import shown
from memory.record import StoredFact

KEY_METRICS = ("took", "failed", "damage", "floor", "known_acc", "perplexity", "retention", "efficacy", "interference",
               "delta_ratio", "weights_tier", "memory_tier", "memory_slots", "memory_slot_norm", "memory_fire_rate")


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def batch_row(ledger: Ledger, b: BatchInfo) -> dict[str, Any]:
    after = ledger.metrics(b.id).get("after", {})
    return {"batch": b.id, "time": when(b.created_at), "facts": b.n_facts, "method": b.method, "status": b.status,
            "layers": b.layers, "reason": b.reason, "replay_of": b.replay_of, "kind": b.kind,
            "covered_by": b.covered_by, "metrics": {k: after[k] for k in KEY_METRICS if k in after}}


def history_rows(ledger: Ledger, limit: int | None) -> list[dict[str, Any]]:
    """Newest first, at most `limit` batches."""
    batches = list(reversed(ledger.history()))
    return [batch_row(ledger, b) for b in (batches[:limit] if limit else batches)]


def history_line(row: dict[str, Any]) -> str:
    metrics = " ".join(f"{k}={v:.3g}" for k, v in row["metrics"].items())
    if row.get("kind") == "consolidated":
        metrics = f"(consolidation) {metrics}"
    elif row.get("covered_by"):
        metrics = f"(in batch {row['covered_by']}) {metrics}"
    return (f"#{row['batch']:<4} {row['time']}  {row['facts']:>3} fact(s)  {shown(row['method']):<8} "
            f"{shown(row['status']):<11} {metrics}").rstrip()


def fact_row(f: StoredFact) -> dict[str, Any]:
    """A fact as JSON: ledger id, the source's id, status, batch, reason, and the record's fields."""
    r = f.record
    return {"id": f.id, "source_id": r.id, "status": f.status, "tier": f.tier, "batch": f.batch_id, "reason": f.reason,
            "superseded_by": f.superseded_by, "subject": r.subject, "prompt": r.prompt, "target": r.target,
            "text": r.text, "source": r.source}


def event_row(e: Event) -> dict[str, Any]:
    return {"id": e.id, "time": when(e.at), "kind": e.kind, "batch": e.batch_id, "message": e.message,
            "data": e.data}


def fact_line(f: StoredFact) -> str:
    r = f.record
    where = f" batch {f.batch_id}" if f.batch_id else ""
    why = f" ({shown(f.reason)})" if f.reason else ""
    tier = f" [tier: {f.tier}]" if f.tier else ""
    return f"f{f.id:<5} {f.status:<11}{where}  {shown(r.text)} -> {shown(r.target)}{why}{tier}"


def event_line(e: Event) -> str:
    return f"  {when(e.at)} {shown(e.kind)}: {shown(e.message)}"


def fact_events(ledger: Ledger, fact_id: int) -> list[Event]:
    """Events that name the fact (in `data.facts` or `data.fact`)."""
    def names(e: Event) -> bool:
        ids = e.data.get("facts")
        return (isinstance(ids, list) and fact_id in ids) or e.data.get("fact") == fact_id
    return [e for e in ledger.events() if names(e)]


def fact_detail(ledger: Ledger, f: StoredFact) -> str:
    lines = [fact_line(f), shown(json.dumps(f.record.model_dump(mode="json"), ensure_ascii=False))]
    if f.superseded_by:
        lines.append(f"superseded by fact {f.superseded_by}")
    lines += [event_line(e) for e in fact_events(ledger, f.id)]
    rows = same_subject.stored_probes(ledger.probes(), f.id)
    if rows:
        lines.append(f"other answers about {shown(f.record.subject)} (before -> after its batch; * = the unedited "
                     "model was sure):")
        lines += [f"  {'same   ' if r['correct'] else 'CHANGED'} {'*' if r['kind'] == same_subject.SUBJECT_PROBE else ' '} "
                  f"{shown(r['prompt'])} {shown(repr(r['expected'].strip()))} -> {shown(repr(r['output'].strip()))}"
                  for r in rows]
    return "\n".join(lines)


def fact_json(ledger: Ledger, f: StoredFact) -> dict[str, Any]:
    """`show fN --json`: the fact's row, its full record and its events."""
    return fact_row(f) | {"record": f.record.model_dump(mode="json"),
                          "events": [event_row(e) for e in fact_events(ledger, f.id)],
                          "subject_answers": [{"prompt": r["prompt"], "before": r["expected"], "after": r["output"],
                                               "same": bool(r["correct"]),
                                               "sure": r["kind"] == same_subject.SUBJECT_PROBE}
                                              for r in same_subject.stored_probes(ledger.probes(), f.id)]}


def batch_detail(ledger: Ledger, batch_id: int) -> str:
    b = ledger.batch(batch_id)
    lines = [history_line(batch_row(ledger, b))]
    if b.reason:
        lines.append(f"reason: {shown(b.reason)}")
    lines.append(f"layers: {b.layers}  delta: {b.delta_hash[:12]}  keys: {b.keys_hash[:12]}")
    for phase, values in sorted(ledger.metrics(batch_id).items()):
        lines.append(f"{phase}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    lines += ["facts:"] + [f"  {fact_line(f)}" for f in ledger.batch_facts(batch_id)]
    lines += ["events:"] + [event_line(e) for e in ledger.events() if e.batch_id == batch_id]
    return "\n".join(lines)


def batch_json(ledger: Ledger, batch_id: int) -> dict[str, Any]:
    """`show bN --json`: the history row plus hashes, every metric phase, the facts and the batch's events."""
    b = ledger.batch(batch_id)
    return batch_row(ledger, b) | {
        "delta_hash": b.delta_hash, "keys_hash": b.keys_hash, "metrics_by_phase": ledger.metrics(batch_id),
        "fact_list": [fact_row(f) for f in ledger.batch_facts(batch_id)],
        "events": [event_row(e) for e in ledger.events() if e.batch_id == batch_id]}


def status_counts(ledger: Ledger) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in ledger.facts():
        out[f.status] = out.get(f.status, 0) + 1
    return out


def tier_counts(ledger: Ledger) -> dict[str, int]:
    """Applied facts per tier: memory (an entity-memory slot answers them) and weights (the weights do)."""
    tiers = [f.tier for f in ledger.facts(status="applied")]
    return {t: tiers.count(t) for t in ("memory", "weights")}


def status_json(root: Path, cfg: AgentConfig, baseline: Baseline | None, writer: str | None,
                ledger: Ledger) -> dict[str, Any]:
    """`kagent status`: workspace, model, config in use, baseline, writer, facts by status, last batch, feeds."""
    rows = history_rows(ledger, 1)
    return {"workspace": str(root), "model": cfg.model, "method": cfg.method, "batch_size": cfg.batch_size,
            "order": cfg.order, "baseline": baseline.model_dump() if baseline else None, "writer": writer,
            "facts": dict(sorted(status_counts(ledger).items())), "tiers": tier_counts(ledger),
            "last_batch": rows[0] if rows else None,
            "feeds": [{"feed": feed, "offset": ledger.feed_offset(feed)} for feed in cfg.feeds]}


def status_text(info: dict[str, Any]) -> str:
    lines = [f"workspace {shown(info['workspace'])}",
             f"model {shown(info['model'])} ({info['method']}), batch size {info['batch_size']}, order {info['order']}"]
    if b := info["baseline"]:
        acc = "n/a" if b["known_acc"] is None else f"{b['known_acc']:.3f}"
        lines.append(f"baseline known-fact accuracy {acc}, perplexity {b['perplexity']:.2f}")
    lines.append(f"writer: {info['writer']}" if info["writer"] else "writer: none (idle)")
    lines.append("facts: " + (", ".join(f"{n} {s}" for s, n in info["facts"].items()) or "none"))
    if any(info.get("tiers", {}).values()):
        lines.append("applied facts by tier: " + ", ".join(f"{n} {t}" for t, n in info["tiers"].items()))
    lines.append("last batch: " + (history_line(info["last_batch"]) if info["last_batch"] else "none"))
    lines += [f"feed {shown(f['feed'])}: byte {f['offset']}" for f in info["feeds"]]
    return "\n".join(lines)


def verify_summary(ledger: Ledger) -> str:
    """What `kagent verify` checked, as one line."""
    batches = ledger.history()
    committed = sum(b.status == "committed" for b in batches)
    return (f"{len(batches)} batch(es) ({committed} committed), {len(ledger.fact_ids())} fact(s), "
            f"{len(ledger.tracked_layers())} tracked layer(s) verified")


def report_rows(ledger: Ledger) -> list[ReportRow]:
    """Committed batches, oldest first, with the running number of applied edits."""
    rows, total = [], 0
    for b in ledger.history():
        if b.status != "committed":
            continue
        total += b.n_facts
        rows.append(ReportRow(b.id, when(b.created_at), b.n_facts, total, b.status, b.method,
                              ledger.metrics(b.id).get("after", {})))
    return rows


def check_rows(model, tok, facts: list[StoredFact], probes: list[dict] | None = None) -> list[dict[str, Any]]:
    """Per fact: does the model's greedy answer begin with its target? With the answer where it does not, and its
    specificity: the share of its subject's other statements (stored by the batch's same-subject check) whose
    answer is still the unedited model's (None where none was stored)."""
    from evaluators.scoring import greedy_answers, greedy_matches

    hits = greedy_matches(model, tok, [f.record.text for f in facts], [f.record.target for f in facts],
                          progress=True).tolist() if facts else []
    missed = [f for f, hit in zip(facts, hits) if not hit]
    says = dict(zip([f.id for f in missed], greedy_answers(model, tok, [f.record.text for f in missed], 8)))
    kept = {fid: now for fid, (_, now) in same_subject.kept_by_fact(model, tok, facts, probes or []).items()}
    return [{"fact": f.id, "batch": f.batch_id, "prompt": f.record.text, "target": f.record.target, "took": hit,
             "answer": None if hit else says[f.id].strip(), "specificity": kept[f.id]}
            for f, hit in zip(facts, hits)]


def edited(memory, model):
    """The entity memory (editors.entity_memory.EntityMemory or None) attached to `model` for a `with` block."""
    from contextlib import nullcontext

    return memory.attached(model) if memory is not None else nullcontext()


def check_summary(rows: list[dict[str, Any]]) -> str:
    """`check`'s last line(s): how many facts answer, and how much of their subjects stayed as it was."""
    out = f"{sum(r['took'] for r in rows)} of {len(rows)} applied fact(s) answer their target"
    kept = [r["specificity"] for r in rows if r.get("specificity") is not None]
    if kept:
        out += (f"\ntheir subjects' other answers kept: {sum(kept) / len(kept):.1%} on average over {len(kept)} "
                "fact(s) (kagent show fN lists them)")
    return out


def check_line(row: dict[str, Any]) -> str:
    said = "" if row["took"] else f"  (model: {shown(repr(row['answer']))})"
    spec = "" if row.get("specificity") is None else f"  [subject kept {row['specificity']:.0%}]"
    return (f"f{row['fact']:<5} {'took' if row['took'] else 'MISSED':<6} {shown(row['prompt'])} -> "
            f"{shown(row['target'])}{said}{spec}")


def took_probes(ledger: Ledger) -> dict[int, dict[str, Any]]:
    """fact id -> the latest probes-table row of kind TOOK_PROBE about it."""
    return {p["fact_id"]: p for p in ledger.probes() if p["kind"] == TOOK_PROBE and p["fact_id"] is not None}


def report_facts(ledger: Ledger, limit: int) -> list[FactRow]:
    """The latest `limit` facts, newest first, with whether each took (None where no probe says)."""
    took = took_probes(ledger)
    out = []
    for f in reversed(ledger.facts()[-limit:]):
        probe = took.get(f.id, {})
        correct = probe.get("correct")
        out.append(FactRow(f.id, f.record.text, f.record.target, f.status, f.batch_id, f.reason,
                           None if correct is None else bool(correct), probe.get("output"), f.tier))
    return out


def report_events(ledger: Ledger) -> list[EventRow]:
    """Events that go on the report's timeline, oldest first."""
    return [EventRow(e.at, e.kind, e.batch_id, e.message) for e in ledger.events() if lane(e.kind)]


def report_data(ledger: Ledger, title: str, baseline: dict[str, float], fact_limit: int) -> ReportData:
    counts = status_counts(ledger)
    return ReportData(title, report_rows(ledger), baseline, report_facts(ledger, fact_limit), sum(counts.values()),
                      counts, report_events(ledger))
