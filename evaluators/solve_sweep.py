"""Solve-side sweep: target values optimised once, then solved with several hyperparameter overrides.

The value optimisation is most of an edit's cost and does not depend on lambda or alpha, so
the trade-off those set (efficacy against collateral damage) can be measured for many
settings at the price of one batch: for each override the batch is solved, applied,
scored on CounterFact (ES/PS/NS) and the known-fact probes, and reverted.

    python -m evaluators.solve_sweep --n 100 --set '[{}, {"alpha": 100}, {"mom2_weight": 10000}]'
"""
from __future__ import annotations

import json
import time

import click
import torch

from editors.models import DEFAULT_MODEL, load_model
from editors.optimise import ValueResult, optimise_values
from editors.registry import make_editor
from evaluators import probes
from evaluators.counterfact import evaluate_counterfact, load_counterfact, to_requests


def sweep(model_name: str, facts: str, n: int, method: str, overrides: list[dict]) -> list[dict]:
    """One row per override: ES, PS, NS, Score, known-fact accuracy, ||Delta||_F per layer."""
    lm = load_model(model_name)
    records = load_counterfact(facts, n)
    requests = to_requests(records)
    base = make_editor(method, lm.model, lm.tok)
    t = time.perf_counter()
    values = optimise_values(lm.model, lm.tok, requests, base.state.context_templates, base.hp)
    click.echo(f"target values for {n} edits: {time.perf_counter() - t:.0f} s, mean steps "
               f"{sum(values.steps) / n:.2f}", err=True)
    rows = []
    for override in overrides:
        editor = make_editor(method, lm.model, lm.tok, state=base.state, **override)
        result = editor.solve_values(requests, values)
        result.delta.apply(lm.model)
        try:
            cf = evaluate_counterfact(lm.model, lm.tok, records, progress=False)
            known = probes.known_fact_accuracy(lm.model, lm.tok)
        finally:
            result.delta.revert(lm.model)
        fro = [float(torch.linalg.matrix_norm(d.u @ d.v.T)) for d in result.delta.layers]
        rows.append({"override": override, "es": cf.es, "ps": cf.ps, "ns": cf.ns, "score": cf.score,
                     "known_acc": known, "delta_fro": fro})
        click.echo(json.dumps(rows[-1]))
    return rows


@click.command()
@click.option("--facts", default="../shared/data/counterfact/counterfact-train.json", help="CounterFact JSON file.")
@click.option("--n", default=100, help="Edits in the one batch.")
@click.option("--method", default="encore", help="Editor whose defaults the overrides modify.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, help="Model alias, directory or hub name.")
@click.option("--set", "overrides", default="[{}]", help="JSON list of hyperparameter overrides.")
def main(facts: str, n: int, method: str, model_name: str, overrides: str) -> None:
    """Solve one batch of fixed target values under several hyperparameter overrides."""
    sweep(model_name, facts, n, method, json.loads(overrides))


if __name__ == "__main__":
    main()
