"""The HTML report: matplotlib plots of norm growth, superposition statistics, probe metrics and edit retention
against the number of edits, the event timeline (rollbacks, bisections, quarantines, consolidations), and tables of
batches, facts and events. Plots are embedded as base64 PNGs (one self-contained file). The page is the Jinja2
template agent/templates/report.html.j2 (package data), autoescaped.

"Took" is whether the model's greedy answer to the fact's prompt is its target. The report reads it from the
ledger's probes table (the latest row of kind evaluators.probes.suite.TOOK_PROBE for the fact: `correct`, `output`);
a fact no such row names shows "not checked". Every value the template prints goes through `memory.hygiene.shown`
before HTML escaping (the environment's `finalize`), so no bidirectional override or control character reaches the
page raw.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
import matplotlib
from markupsafe import Markup

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from memory.hygiene import shown  # noqa: E402

SUPERPOSITION_STATS = ("mean", "std", "kurtosis", "tail", "max")
# event kinds on the timeline, in lane order (bottom to top); kinds starting with "consolid" share the last lane
TIMELINE = ("commit", "replay", "rollback", "reject", "bisect", "split", "defer", "quarantine", "flash",
            "consolidation")
TEMPLATE = "report.html.j2"  # in agent/templates (package data)
BATCH_COLUMNS = ("known_acc", "perplexity", "retention", "efficacy", "interference", "delta_ratio")  # batches table
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
    took: bool | None = None  # greedy answer == target (evaluators.probes.suite.TOOK_PROBE row); None = not checked
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
    """The memory tier's monitors and the tier split against edits (evaluators/monitors/memory_tier.py)."""
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


# ----------------------------------------------------------------------------- page


def table_events(events: Sequence[EventRow]) -> list[EventRow]:
    """The events the table lists: all but commits, newest first, at most MAX_EVENT_ROWS."""
    return [e for e in reversed(events) if e.kind != "commit"][:MAX_EVENT_ROWS]


def summary_cards(data: ReportData) -> list[tuple[object, str]]:
    """(value, label) of each card atop the page."""
    edits = data.batches[-1].edits_total if data.batches else 0
    checked = [f for f in data.facts if f.took is not None]
    cards: list[tuple[object, str]] = [(len(data.batches), "committed batches"), (edits, "edits applied"),
                                       (data.facts_total, "facts")]
    cards += [(n, status) for status, n in sorted(data.status_counts.items())]
    if checked:
        cards.append((f"{sum(f.took for f in checked)}/{len(checked)}", "took (of checked)"))
    return cards


def figures(data: ReportData) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each plot; a plot is shown only where some batch measured what it plots."""
    rows = data.batches
    figs = []
    if _has(rows, "norm_drift."):
        figs.append(("Norm growth of the edited layers", norm_plot(rows)))
    if _has(rows, "within_", "prior_"):
        figs.append(("Superposition: whitened key overlaps (within the batch / with earlier edits)",
                     superposition_plot(rows)))
    if _has(rows, "memory_", "weights_tier"):
        figs.append(("Two tiers: memory slots, facts per tier and the memory's monitors", tier_plot(rows)))
    return figs + [("Downstream probes and retention of earlier edits", probe_plot(rows, data.baseline)),
                   ("Event timeline: commits, rollbacks, bisections, quarantines, consolidations",
                    timeline_plot(data.events))]


def _shown(value: object) -> object:
    """Every `{{ value }}` of the template: ledger text with invisible and text-moving characters escaped visibly
    (autoescape then HTML-escapes it); None prints nothing; the template's own macros' markup passes as it is."""
    if isinstance(value, Markup):
        return value
    return "" if value is None else shown(str(value))


def environment() -> jinja2.Environment:
    """The report's templates (agent/templates, shipped as package data), autoescaped; an undefined name in a
    template is an error, not an empty string."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("agent", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, finalize=_shown)
    env.filters["when"] = lambda ts: f"{datetime.fromtimestamp(ts):%Y-%m-%d %H:%M:%S}"
    return env


def render_report(data: ReportData) -> str:
    """The complete HTML page (agent/templates/report.html.j2)."""
    return environment().get_template(TEMPLATE).render(
        title=data.title, batches=data.batches, edits=data.batches[-1].edits_total if data.batches else 0,
        cards=summary_cards(data), figures=figures(data), batch_cols=BATCH_COLUMNS, colours=STATUS_COLOURS,
        facts=data.facts, facts_total=data.facts_total, events=table_events(data.events),
        max_event_rows=MAX_EVENT_ROWS)
