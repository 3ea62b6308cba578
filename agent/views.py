"""Read-only views of a workspace for the CLI: history rows, batch and fact details, status, report rows.

These read the ledger only (no model), so they work while another process holds the write lock. Every text that
came from a feed, a reason or an event passes through `memory.hygiene.shown`, so invisible and text-moving
characters (bidirectional overrides, NUL, ...) are printed as visible escapes, for facts stored before the feed
refused them too.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agent.report import ReportRow, SetAsideRow
from memory.hygiene import shown
from memory.ledger import BatchInfo, Event, Ledger
from memory.record import StoredFact

KEY_METRICS = ("known_acc", "perplexity", "retention", "efficacy", "interference", "delta_ratio")


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def batch_row(ledger: Ledger, b: BatchInfo) -> dict[str, Any]:
    after = ledger.metrics(b.id).get("after", {})
    return {"batch": b.id, "time": when(b.created_at), "facts": b.n_facts, "method": b.method, "status": b.status,
            "layers": b.layers, "reason": b.reason, "replay_of": b.replay_of,
            "metrics": {k: after[k] for k in KEY_METRICS if k in after}}


def history_rows(ledger: Ledger, limit: int | None) -> list[dict[str, Any]]:
    """Newest first, at most `limit` batches."""
    batches = list(reversed(ledger.history()))
    return [batch_row(ledger, b) for b in (batches[:limit] if limit else batches)]


def history_line(row: dict[str, Any]) -> str:
    metrics = " ".join(f"{k}={v:.3g}" for k, v in row["metrics"].items())
    return (f"#{row['batch']:<4} {row['time']}  {row['facts']:>3} fact(s)  {shown(row['method']):<8} "
            f"{shown(row['status']):<11} {metrics}").rstrip()


def fact_line(f: StoredFact) -> str:
    r = f.record
    where = f" batch {f.batch_id}" if f.batch_id else ""
    why = f" ({shown(f.reason)})" if f.reason else ""
    return f"f{f.id:<5} {f.status:<11}{where}  {shown(r.text)} -> {shown(r.target)}{why}"


def event_line(e: Event) -> str:
    return f"  {when(e.at)} {shown(e.kind)}: {shown(e.message)}"


def fact_detail(ledger: Ledger, f: StoredFact) -> str:
    lines = [fact_line(f), shown(json.dumps(f.record.model_dump(mode="json"), ensure_ascii=False))]
    if f.superseded_by:
        lines.append(f"superseded by fact {f.superseded_by}")
    for e in ledger.events():
        ids = e.data.get("facts")
        if (isinstance(ids, list) and f.id in ids) or e.data.get("fact") == f.id:
            lines.append(event_line(e))
    return "\n".join(lines)


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


def status_counts(ledger: Ledger) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in ledger.facts():
        out[f.status] = out.get(f.status, 0) + 1
    return out


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


def set_aside_rows(ledger: Ledger) -> list[SetAsideRow]:
    """Quarantined facts, oldest first, with the reason each was set aside (for the report)."""
    return [SetAsideRow(f.id, f.record.text, f.record.target, f.reason or "") for f in ledger.facts(status="quarantined")]
