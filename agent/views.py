"""Read-only views of a workspace for the CLI: history rows, batch and fact details, status, report rows.

These read the ledger only (no model), so they work while another process holds the write lock; `check_rows`
alone asks a model (the one `kagent check` loaded).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agent.report import ReportRow
from memory.ledger import BatchInfo, Ledger
from memory.record import StoredFact

KEY_METRICS = ("took", "failed", "damage", "floor", "known_acc", "perplexity", "retention", "efficacy", "interference",
               "delta_ratio")


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
    return (f"#{row['batch']:<4} {row['time']}  {row['facts']:>3} fact(s)  {row['method']:<8} {row['status']:<11} "
            f"{metrics}").rstrip()


def fact_line(f: StoredFact) -> str:
    r = f.record
    where = f" batch {f.batch_id}" if f.batch_id else ""
    why = f" ({f.reason})" if f.reason else ""
    return f"f{f.id:<5} {f.status:<11}{where}  {r.text} -> {r.target}{why}"


def fact_detail(ledger: Ledger, f: StoredFact) -> str:
    lines = [fact_line(f), json.dumps(f.record.model_dump(mode="json"), ensure_ascii=False)]
    if f.superseded_by:
        lines.append(f"superseded by fact {f.superseded_by}")
    for e in ledger.events():
        ids = e.data.get("facts")
        if (isinstance(ids, list) and f.id in ids) or e.data.get("fact") == f.id:
            lines.append(f"  {when(e.at)} {e.kind}: {e.message}")
    return "\n".join(lines)


def batch_detail(ledger: Ledger, batch_id: int) -> str:
    b = ledger.batch(batch_id)
    lines = [history_line(batch_row(ledger, b))]
    if b.reason:
        lines.append(f"reason: {b.reason}")
    lines.append(f"layers: {b.layers}  delta: {b.delta_hash[:12]}  keys: {b.keys_hash[:12]}")
    for phase, values in sorted(ledger.metrics(batch_id).items()):
        lines.append(f"{phase}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    lines += ["facts:"] + [f"  {fact_line(f)}" for f in ledger.batch_facts(batch_id)]
    lines += ["events:"] + [f"  {when(e.at)} {e.kind}: {e.message}" for e in ledger.events() if e.batch_id == batch_id]
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


def check_rows(model, tok, facts: list[StoredFact]) -> list[dict[str, Any]]:
    """Per fact: does the model's greedy answer begin with its target? With the answer where it does not."""
    from evaluators.scoring import greedy_answers, greedy_matches

    hits = greedy_matches(model, tok, [f.record.text for f in facts], [f.record.target for f in facts],
                          progress=True).tolist() if facts else []
    missed = [f for f, hit in zip(facts, hits) if not hit]
    says = dict(zip([f.id for f in missed], greedy_answers(model, tok, [f.record.text for f in missed], 8)))
    return [{"fact": f.id, "batch": f.batch_id, "prompt": f.record.text, "target": f.record.target, "took": hit,
             "answer": None if hit else says[f.id].strip()} for f, hit in zip(facts, hits)]


def check_line(row: dict[str, Any]) -> str:
    said = "" if row["took"] else f"  (model: {row['answer']!r})"
    return f"f{row['fact']:<5} {'took' if row['took'] else 'MISSED':<6} {row['prompt']} -> {row['target']}{said}"
