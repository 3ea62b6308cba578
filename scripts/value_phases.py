"""Where one ENCORE batch's editing time goes: prefix pass, optimisation steps, keys and solves.

Times `Editor.compute` on the first N CounterFact records in one batch, with the value
optimisation's phases timed by wrapping `SuffixRunner.precompute` (prefix pass, no grad),
`SuffixRunner.run` (suffix forwards) and `optimise._losses` (forwards + loss); the rest of the
value time is backward passes and Adam steps. The model is unchanged afterwards.

    python scripts/value_phases.py --n 64 --value-chunk 16
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import click

from editors import optimise, values
from editors.models import DEFAULT_MODEL, load_model
from editors.registry import METHODS, make_editor
from evaluators.counterfact import load_counterfact, to_requests

# the data sets live in shared/ beside the repository (../shared from its root), wherever this runs from
DEFAULT_FACTS = Path(__file__).resolve().parent.parent.parent / "shared/data/counterfact/counterfact-train.json"


@contextmanager
def timed(owner, name: str, totals: dict[str, float]):
    """Add the wall time of every call of `owner.name` to totals[name] while the block runs."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def phases(model_name: str, facts: str, n: int, method: str, **overrides) -> dict[str, float]:
    """Seconds per phase of one `compute` of the first n records, and edits per second."""
    lm = load_model(model_name)
    requests = to_requests(load_counterfact(facts, n))
    editor = make_editor(method, lm.model, lm.tok, **overrides)
    totals: dict[str, float] = {}
    with timed(values.SuffixRunner, "precompute", totals), timed(values.SuffixRunner, "run", totals), \
            timed(optimise, "_losses", totals):
        t = time.perf_counter()
        result = editor.compute(requests)
        total = time.perf_counter() - t
    return {"prefix_pass": totals.get("precompute", 0.0), "suffix_forwards": totals.get("run", 0.0),
            "forwards_and_loss": totals.get("_losses", 0.0), **result.seconds, "wall": total,
            "edits_per_second": n / total, "mean_steps": sum(result.steps) / n}


@click.command()
@click.option("--facts", default=str(DEFAULT_FACTS), show_default=True, help="CounterFact JSON file.")
@click.option("--n", default=64, help="Edits in the one batch.")
@click.option("--method", default="encore", type=click.Choice(METHODS.names()), help="Editor to time.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, help="Model alias, directory or hub name.")
@click.option("--value-chunk", default=16, help="Edits whose values are optimised together.")
def main(facts: str, n: int, method: str, model_name: str, value_chunk: int) -> None:
    """Print the seconds each phase of one batch's edit takes, as JSON."""
    click.echo(json.dumps({k: round(v, 2) for k, v in
                           phases(model_name, facts, n, method, value_chunk=value_chunk).items()}))


if __name__ == "__main__":
    main()
