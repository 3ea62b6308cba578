"""The HTML report: matplotlib plots of norm growth, superposition statistics, probe metrics and edit retention
against the number of edits, a table of batches and one of the facts set aside (quarantined, with the reason).
Plots are embedded as base64 PNGs (one self-contained file). Text from the ledger goes through
`memory.hygiene.shown` before HTML escaping, so no bidirectional override or control character reaches the page raw.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from memory.hygiene import shown  # noqa: E402

SUPERPOSITION_STATS = ("mean", "std", "kurtosis", "tail", "max")


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
class SetAsideRow:
    """One quarantined fact as the report sees it."""

    fact_id: int
    text: str  # the prompt with the subject filled in
    target: str
    reason: str  # why it was set aside


def _text(value: str) -> str:
    """Ledger text as HTML: invisible and text-moving characters escaped visibly, then HTML-escaped."""
    return html.escape(shown(value))


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


def norm_plot(rows: Sequence[ReportRow]) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in _names(rows, "norm_ratio."):
        a.plot(*_series(rows, name), marker=".", label=name.split(".", 1)[1])
    for name in _names(rows, "norm_drift."):
        b.plot(*_series(rows, name), marker=".", label=name.split(".", 1)[1])
    a.set(title="||W_t|| / ||W_0||", xlabel="edits")
    b.set(title="||W_t - W_0|| / ||W_0||", xlabel="edits")
    for ax in (a, b):
        ax.legend(fontsize=7) if ax.lines else None
    return _png(fig)


def superposition_plot(rows: Sequence[ReportRow]) -> str:
    fig, axes = plt.subplots(1, len(SUPERPOSITION_STATS), figsize=(14, 3))
    for ax, stat in zip(axes, SUPERPOSITION_STATS):
        for scope in ("within", "prior"):
            ax.plot(*_series(rows, f"{scope}_{stat}"), marker=".", label=scope)
        ax.set(title=f"overlap {stat}", xlabel="edits")
        ax.legend(fontsize=7) if ax.lines else None
    return _png(fig)


def probe_plot(rows: Sequence[ReportRow], baseline: dict[str, float]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, name in zip(axes, ("known_acc", "perplexity", "retention")):
        ax.plot(*_series(rows, name), marker=".")
        if name in baseline:
            ax.axhline(baseline[name], color="grey", linestyle="--", label="baseline")
            ax.legend(fontsize=7)
        ax.set(title=name.replace("_", " "), xlabel="edits")
    return _png(fig)


def _table(rows: Sequence[ReportRow]) -> str:
    cols = ("known_acc", "perplexity", "retention", "interference", "delta_ratio")
    head = "".join(f"<th>{c}</th>" for c in ("batch", "time", "facts", "edits", "method", "status", *cols))
    body = []
    for r in rows:
        vals = "".join(f"<td>{r.metrics[c]:.4g}</td>" if c in r.metrics else "<td></td>" for c in cols)
        body.append(f"<tr><td>{r.batch_id}</td><td>{_text(r.time)}</td><td>{r.n_facts}</td>"
                    f"<td>{r.edits_total}</td><td>{_text(r.method)}</td><td>{_text(r.status)}</td>{vals}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _set_aside_table(rows: Sequence[SetAsideRow]) -> str:
    if not rows:
        return "<p>none</p>"
    body = "".join(f"<tr><td>f{r.fact_id}</td><td>{_text(r.text)}</td><td>{_text(r.target)}</td>"
                   f"<td>{_text(r.reason)}</td></tr>" for r in rows)
    return f"<table><tr><th>fact</th><th>prompt</th><th>target</th><th>reason</th></tr>{body}</table>"


def render(rows: Sequence[ReportRow], title: str, baseline: dict[str, float] | None = None,
           set_aside: Sequence[SetAsideRow] = ()) -> str:
    """The complete HTML page for committed batches `rows` (oldest first) and quarantined facts `set_aside`."""
    sections = [("Norm growth of the edited layers", norm_plot(rows)),
                ("Superposition: whitened key overlaps (within the batch / with earlier edits)",
                 superposition_plot(rows)),
                ("Downstream probes and retention of earlier edits", probe_plot(rows, baseline or {}))]
    figs = "".join(f"<h2>{_text(t)}</h2><img alt='{_text(t)}' src='data:image/png;base64,{png}'>"
                   for t, png in sections)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_text(title)}</title>"
            f"<style>{style}</style></head><body><h1>{_text(title)}</h1>"
            f"<p>{len(rows)} batches, {rows[-1].edits_total if rows else 0} edits applied.</p>"
            f"{figs}<h2>Batches</h2>{_table(rows)}"
            f"<h2>Facts set aside (quarantined)</h2>{_set_aside_table(set_aside)}</body></html>")
