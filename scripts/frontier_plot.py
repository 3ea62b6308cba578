"""The efficacy/damage frontier: ES and greedy ES against known-fact accuracy and perplexity, one point per variant.

    python scripts/frontier_plot.py --history docs/frontier_history.json \
        --run "ENCORE default 5000-5999=docs/runs/bench-5000-encore-ctx2.json" ... --out docs/frontier.png

Each `--run LABEL=FILE` is a `kagent bench --json` file (a list of result rows); every row but `unedited` becomes a
point named after the label and its method. The label's last word is the record range (e.g. "2 prefixes 5000-5999").
`--history` is a JSON list of rows transcribed from earlier BENCHMARKS.md tables (runs whose files were not kept),
each with at least variant, records, es, known_acc_after, ppl_ratio and optionally greedy_es. The left panel plots
ES (filled) and greedy ES (hollow) against known-fact accuracy, the right one against perplexity relative to the
unedited model; the upper right of the left panel and the upper left of the right one are where a product wants
to be. Marker shape says which records were edited (tuning records 0-999 or a hold-out).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Point:
    variant: str  # what was run (method and settings)
    records: str  # which CounterFact records: "0-999" (tuned on) or a hold-out range
    es: float  # efficacy by NLL (P(new) > P(old))
    greedy_es: float | None  # greedy continuation begins with the target (None: not measured then)
    known: float  # known-fact accuracy after the edits
    ppl_ratio: float  # perplexity after / before


def from_bench(label: str, path: Path) -> list[Point]:
    """Points of one `kagent bench --json` file; `label` names the run (e.g. its record range)."""
    rows = json.loads(path.read_text())
    name, _, records = label.rpartition(" ")  # "ENCORE, 2 prefixes, 5000-5999": the run's name, then its records
    out = []
    for r in rows:
        if r["method"] == "unedited":
            continue
        extra = "" if r.get("hparams", {}).get("write", "weights") == "weights" else f" ({r['hparams']['write']})"
        what = f"{r['method']}{extra}, {r['n']} in batches of {r['batch_size']}"
        out.append(Point(f"{name.rstrip(', ')}: {what}" if name else what, records, r["es"], r.get("greedy_es"),
                         r["known_acc_after"], r["ppl_after"] / r["ppl_before"]))
    return out


def from_history(path: Path) -> list[Point]:
    return [Point(r["variant"], r["records"], r["es"], r.get("greedy_es"), r["known_acc_after"], r["ppl_ratio"])
            for r in json.loads(path.read_text())]


def draw(points: list[Point], out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colours = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")  # one colour per point
    shapes = {rec: "osD^v"[i % 5] for i, rec in enumerate(dict.fromkeys(p.records for p in points))}
    for i, p in enumerate(points):
        c, m = colours(i % colours.N), shapes[p.records]
        for ax, x in ((left, p.known), (right, p.ppl_ratio)):
            ax.scatter([x], [p.es], color=c, marker=m, s=60, label=f"{p.variant} [{p.records}]" if ax is left else None)
            if p.greedy_es is not None:
                ax.scatter([x], [p.greedy_es], facecolors="none", edgecolors=[c], marker=m, s=60)
                ax.plot([x, x], [p.greedy_es, p.es], color=c, lw=0.6, alpha=0.6)
    left.set_xlabel("known-fact accuracy after the edits (138 facts)")
    right.set_xlabel("perplexity after / before (WikiText-2 held-out)")
    left.set_ylabel("efficacy: filled = ES (by NLL), hollow = greedy ES")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Efficacy against damage at 1,000 CounterFact edits, SmolLM2-135M")
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(points) + 1) // 2), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--history", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rows transcribed from earlier BENCHMARKS.md tables.")
@click.option("--run", "runs", multiple=True, help="LABEL=FILE: a kagent bench --json file and its record range.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The PNG to write.")
def main(history: Path | None, runs: tuple[str, ...], out: Path) -> None:
    """Draw the efficacy/damage frontier of every variant into one PNG."""
    points = from_history(history) if history else []
    for spec in runs:
        label, _, path = spec.rpartition("=")
        points += from_bench(label, Path(path))
    if not points:
        raise click.UsageError("nothing to plot: give --history or --run")
    draw(points, out)
    click.echo(f"wrote {out} ({len(points)} variants)")


if __name__ == "__main__":
    main()
