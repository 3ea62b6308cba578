"""The HTML report: matplotlib plots of norm growth, superposition statistics, probe metrics and edit retention
against the number of edits, the event timeline (rollbacks, bisections, quarantines, consolidations), and tables of
batches, facts and events. Plots are embedded as base64 PNGs (one self-contained file).

"Took" is whether the model's greedy answer to the fact's prompt is its target. The report reads it from the
ledger's probes table (the latest row of kind agent.probes.TOOK_PROBE for the fact: `correct`, `output`); a fact no such row
names shows "not checked". Text from the ledger goes through `memory.hygiene.shown` before HTML escaping, so no
bidirectional override or control character reaches the page raw.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from memory.hygiene import shown  # noqa: E402

SUPERPOSITION_STATS = ("mean", "std", "kurtosis", "tail", "max")
# event kinds on the timeline, in lane order (bottom to top); kinds starting with "consolid" share the last lane
TIMELINE = ("commit", "replay", "rollback", "reject", "bisect", "split", "defer", "quarantine", "flash",
            "consolidation")
MAX_EVENT_ROWS = 1000  # the events table lists at most this many (the timeline plots all)
STATUS_COLOURS = {"applied": "#1a7f37", "superseded": "#6e7781", "pending": "#9a6700", "dropped": "#6e7781",
                  "rolled_back": "#bc4c00", "quarantined": "#cf222e", "failed": "#cf222e", "committed": "#1a7f37",
                  "replaced": "#6e7781"}


@dataclass
class ReportRow:
    """One committed batch as the report sees it."""

    batch_id: int
    time: str
    n_facts: int
    edits_total: int  # edits applied up to and including this batch
    status: str
    method: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FactRow:
    """One fact as the report's facts table shows it."""

    fact_id: int
    text: str  # the prompt with the subject filled in
    target: str
    status: str
    batch_id: int | None
    reason: str | None
    took: bool | None = None  # greedy answer == target (agent.probes.TOOK_PROBE row); None = not checked
    answer: str | None = None  # the greedy answer that probe recorded
    tier: str | None = None  # applied facts: memory or weights


@dataclass
class EventRow:
    """One ledger event on the timeline."""

    at: float  # unix time
    kind: str
    batch_id: int | None
    message: str


@dataclass
class ReportData:
    """Everything one report shows."""

    title: str
    batches: Sequence[ReportRow]  # committed batches, oldest first
    baseline: dict[str, float] = field(default_factory=dict)
    facts: Sequence[FactRow] = ()  # newest first, possibly only the latest ones
    facts_total: int = 0  # facts in the ledger (the table may show fewer)
    status_counts: dict[str, int] = field(default_factory=dict)
    events: Sequence[EventRow] = ()  # timeline events, oldest first


# ----------------------------------------------------------------------------- plots


def _series(rows: Sequence[ReportRow], name: str) -> tuple[list[int], list[float]]:
    pts = [(r.edits_total, r.metrics[name]) for r in rows if name in r.metrics]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _names(rows: Sequence[ReportRow], prefix: str) -> list[str]:
    return sorted({k for r in rows for k in r.metrics if k.startswith(prefix)})


def _empty_note(ax) -> None:
    if not ax.lines and not ax.collections:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")


def norm_plot(rows: Sequence[ReportRow]) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in _names(rows, "norm_ratio."):
        _plot(a, rows, name, "layer " + name.split(".", 1)[1])
    for name in _names(rows, "norm_drift."):
        _plot(b, rows, name, "layer " + name.split(".", 1)[1])
    a.set(title="||W_t|| / ||W_0||", xlabel="edits")
    b.set(title="||W_t - W_0|| / ||W_0||", xlabel="edits")
    for ax in (a, b):
        ax.legend(fontsize=7) if ax.lines else _empty_note(ax)
    return _png(fig)


def _plot(ax, rows: Sequence[ReportRow], name: str, label: str | None = None) -> None:
    """One metric against the number of edits; nothing when no batch recorded it."""
    xs, ys = _series(rows, name)
    if xs:
        ax.plot(xs, ys, marker=".", label=label)


def superposition_plot(rows: Sequence[ReportRow]) -> str:
    fig, axes = plt.subplots(1, len(SUPERPOSITION_STATS), figsize=(14, 3))
    for ax, stat in zip(axes, SUPERPOSITION_STATS):
        for scope in ("within", "prior"):
            _plot(ax, rows, f"{scope}_{stat}", scope)
        ax.set(title=f"overlap {stat}", xlabel="edits")
        ax.legend(fontsize=7) if ax.lines else _empty_note(ax)
    fig.tight_layout()
    return _png(fig)


def _has(rows: Sequence[ReportRow], *prefixes: str) -> bool:
    """Some batch measured a nonzero metric named with one of `prefixes` (memory batches record a norm drift of 0)."""
    return any(k.startswith(prefixes) and v for r in rows for k, v in r.metrics.items())


def tier_plot(rows: Sequence[ReportRow]) -> str:
    """The memory tier's monitors and the tier split against edits (agent/tiers.py, evaluators/memory_health.py)."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.2))
    for name in ("memory_slots", "memory_tier", "weights_tier"):
        _plot(a, rows, name, name.replace("_", " "))
    for name in ("memory_slot_norm", "memory_slot_norm_mean"):
        _plot(b, rows, name, name.replace("memory_", "").replace("_", " "))
    for name in ("memory_fire_rate",):
        _plot(c, rows, name, "share of held-out lines")
    a.set(title="slots and facts per tier", xlabel="edits")
    b.set(title="slot norm / residual norm at its layer", xlabel="edits")
    c.set(title="slots firing on held-out text", xlabel="edits")
    for ax in (a, b, c):
        ax.legend(fontsize=7) if ax.lines else _empty_note(ax)
    fig.tight_layout()
    return _png(fig)


def probe_plot(rows: Sequence[ReportRow], baseline: dict[str, float]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, name in zip(axes, ("known_acc", "perplexity", "retention")):
        _plot(ax, rows, name)
        _empty_note(ax)
        if name in baseline:
            ax.axhline(baseline[name], color="grey", linestyle="--", label="baseline")
            ax.legend(fontsize=7)
        ax.set(title=name.replace("_", " "), xlabel="edits")
    return _png(fig)


def lane(kind: str) -> str | None:
    """The timeline lane of an event kind (None: not on the timeline)."""
    return "consolidation" if kind.startswith("consolid") else kind if kind in TIMELINE else None


def timeline_plot(events: Sequence[EventRow]) -> str:
    fig, ax = plt.subplots(figsize=(13, 3.6))
    counts = []
    for y, name in enumerate(TIMELINE):
        at = [datetime.fromtimestamp(e.at) for e in events if lane(e.kind) == name]
        counts.append(len(at))
        if at:
            ax.scatter(at, [y] * len(at), s=60 if name == "commit" else 30, marker="|" if name == "commit" else "o")
    ax.set_yticks(range(len(TIMELINE)), [f"{name} ({n})" for name, n in zip(TIMELINE, counts)], fontsize=8)
    ax.set_ylim(-0.7, len(TIMELINE) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set(title="ledger events over time")
    _empty_note(ax)
    return _png(fig)


# ----------------------------------------------------------------------------- tables


def _esc(value: object) -> str:
    """Ledger text as HTML: invisible and text-moving characters escaped visibly, then HTML-escaped."""
    return "" if value is None else html.escape(shown(str(value)))


def _badge(status: str) -> str:
    return f"<span class='badge' style='background:{STATUS_COLOURS.get(status, '#57606a')}'>{_esc(status)}</span>"


def batch_table(rows: Sequence[ReportRow]) -> str:
    cols = ("known_acc", "perplexity", "retention", "efficacy", "interference", "delta_ratio")
    head = "".join(f"<th>{c}</th>" for c in ("batch", "time", "facts", "edits", "method", "status", *cols))
    body = []
    for r in rows:
        vals = "".join(f"<td class='num'>{r.metrics[c]:.4g}</td>" if c in r.metrics else "<td></td>" for c in cols)
        body.append(f"<tr><td class='num'>{r.batch_id}</td><td>{_esc(r.time)}</td><td class='num'>{r.n_facts}</td>"
                    f"<td class='num'>{r.edits_total}</td><td>{_esc(r.method)}</td><td>{_badge(r.status)}</td>"
                    f"{vals}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def took_cell(f: FactRow) -> str:
    if f.took is None:
        return "<td class='muted'>not checked</td>"
    answer = f" <span class='muted'>({_esc(f.answer)})</span>" if f.answer else ""
    return f"<td class='{'yes' if f.took else 'no'}'>{'yes' if f.took else 'no'}{answer}</td>"


def fact_table(facts: Sequence[FactRow]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("fact", "prompt", "target", "status", "tier", "batch",
                                             "took (greedy answer = target)", "reason"))
    body = [f"<tr><td class='num'>f{f.fact_id}</td><td>{_esc(f.text)}</td><td>{_esc(f.target)}</td>"
            f"<td>{_badge(f.status)}</td><td>{_esc(f.tier or '')}</td>"
            f"<td class='num'>{_esc(f.batch_id)}</td>{took_cell(f)}"
            f"<td class='reason'>{_esc(f.reason)}</td></tr>" for f in facts]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def table_events(events: Sequence[EventRow]) -> list[EventRow]:
    """The events the table lists: all but commits, newest first, at most MAX_EVENT_ROWS."""
    return [e for e in reversed(events) if e.kind != "commit"][:MAX_EVENT_ROWS]


def event_table(events: Sequence[EventRow]) -> str:
    head = "<th>time</th><th>event</th><th>batch</th><th>what happened</th>"
    body = [f"<tr><td>{datetime.fromtimestamp(e.at):%Y-%m-%d %H:%M:%S}</td><td>{_esc(e.kind)}</td>"
            f"<td class='num'>{_esc(e.batch_id)}</td><td class='reason'>{_esc(e.message)}</td></tr>"
            for e in table_events(events)]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ----------------------------------------------------------------------------- page

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:1400px;margin:0 auto;padding:24px 32px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
p.lead{color:#57606a;margin:0 0 16px}nav a{margin-right:16px;color:#0969da;text-decoration:none}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#57606a;font-size:13px}
table{border-collapse:collapse;font-size:13px;width:100%}
th{position:sticky;top:0;background:#eaeef2;text-align:left}
td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top}tbody tr:nth-child(even){background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.reason{max-width:520px}
td.yes{color:#1a7f37;font-weight:600}td.no{color:#cf222e;font-weight:600}.muted{color:#6e7781;font-weight:400}
.badge{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px;white-space:nowrap}
img{max-width:100%;display:block;margin:8px 0}.scroll{max-height:640px;overflow:auto;border:1px solid #d0d7de}
"""


def summary_cards(data: ReportData) -> str:
    edits = data.batches[-1].edits_total if data.batches else 0
    checked = [f for f in data.facts if f.took is not None]
    cards = [(len(data.batches), "committed batches"), (edits, "edits applied"), (data.facts_total, "facts")]
    cards += [(n, status) for status, n in sorted(data.status_counts.items())]
    if checked:
        cards.append((f"{sum(f.took for f in checked)}/{len(checked)}", "took (of checked)"))
    return "<div class='cards'>" + "".join(f"<div class='card'><b>{_esc(v)}</b><span>{_esc(k)}</span></div>"
                                           for v, k in cards) + "</div>"


def _figure(title: str, png: str) -> str:
    return f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"


def _facts_note(data: ReportData) -> str:
    listed = len(data.facts)
    more = f"the latest {listed} of {data.facts_total}, newest first; `kagent facts --json` lists all. " \
        if listed < data.facts_total else "Newest first. "
    return f"<p class='lead'>{more}Took: whether the greedy answer to the prompt is the target (after the edit).</p>"


def render_report(data: ReportData) -> str:
    """The complete HTML page."""
    rows = data.batches  # a plot is shown only where some batch measured what it plots
    figs = ([("Norm growth of the edited layers", norm_plot(rows))] if _has(rows, "norm_drift.") else []) + \
        ([("Superposition: whitened key overlaps (within the batch / with earlier edits)", superposition_plot(rows))]
         if _has(rows, "within_", "prior_") else []) + \
        ([("Two tiers: memory slots, facts per tier and the memory's monitors", tier_plot(rows))]
         if _has(rows, "memory_", "weights_tier") else []) + \
        [("Downstream probes and retention of earlier edits", probe_plot(rows, data.baseline)),
         ("Event timeline: commits, rollbacks, bisections, quarantines, consolidations", timeline_plot(data.events))]
    nav = "<nav><a href='#plots'>Plots</a><a href='#batches'>Batches</a><a href='#facts'>Facts</a>" \
          "<a href='#events'>Events</a></nav>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>"
            f"<style>{STYLE}</style></head><body><main><h1>{html.escape(data.title)}</h1>"
            f"<p class='lead'>{len(data.batches)} batches, "
            f"{data.batches[-1].edits_total if data.batches else 0} edits applied.</p>{nav}{summary_cards(data)}"
            f"<div id='plots'>{''.join(_figure(t, png) for t, png in figs)}</div>"
            f"<h2 id='batches'>Batches</h2><div class='scroll'>{batch_table(data.batches)}</div>"
            f"<h2 id='facts'>Facts</h2>{_facts_note(data)}<div class='scroll'>{fact_table(data.facts)}</div>"
            f"<h2 id='events'>Events</h2><p class='lead'>Newest first, at most {MAX_EVENT_ROWS}; commits are on the "
            f"timeline only; `kagent show bN` lists a batch's events.</p>"
            f"<div class='scroll'>{event_table(data.events)}</div></main></body></html>")
