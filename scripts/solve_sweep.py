"""Solve-side sweep: target values optimised once, then solved with several hyperparameter overrides.

The value optimisation is most of an edit's cost and does not depend on lambda or alpha, so
the trade-off those set (efficacy against collateral damage) can be measured for many
settings at the price of one batch: for each override the batch is solved, applied,
scored on CounterFact (ES/PS/NS) and the known-fact probes, and reverted.

    python scripts/solve_sweep.py --n 100 --set '[{}, {"alpha": 100}, {"mom2_weight": 10000}]'

With `--entity-keys N`, an override may also carry "entity_weight": beta. The solve then
preserves C0 + beta * E[k k^T] over the subject keys of N other CounterFact records (taken
from record `--entity-from` on), i.e. it also protects the keys entities have, not only
those of running WikiText tokens. Perplexity on the held-out text is reported per row.

`--values` overrides the hyperparameters of the value optimisation only (e.g. '{"stop": "nll"}'
optimises every target value to MEMIT's NLL threshold instead of stopping at MPES), so the same
solves can be compared on stronger or weaker target values.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from editors.hparams import EditHParams
from editors.models import DEFAULT_MODEL, load_model
from editors.optimise import ValueResult, optimise_values
from editors.registry import METHODS, make_editor
from editors.stats import LayerStats
from evaluators.counterfact import evaluate_counterfact, load_counterfact, to_requests
from evaluators.probes.answers import known_fact_accuracy
from evaluators.probes.perplexity import perplexity

# the data sets live in shared/ beside the repository (../shared from its root), wherever this runs from
DEFAULT_FACTS = Path(__file__).resolve().parent.parent.parent / "shared/data/counterfact/counterfact-train.json"


def entity_moments(editor, facts: str, start: int, n: int) -> dict[int, torch.Tensor]:
    """Per edited layer, E[k k^T] (float64) over the subject keys of records start..start+n."""
    pool = load_counterfact(facts, start + n)[start:]
    keys = editor.keys_by_layer(to_requests(pool))
    return {layer: (k.double() @ k.double().T) / k.shape[1] for layer, k in keys.items()}


def sweep(model_name: str, facts: str, n: int, method: str, overrides: list[dict],
          entity_from: int = 5000, entity_keys: int = 0, value_overrides: dict | None = None) -> list[dict]:
    """One row per override: ES, PS, NS, Score, known-fact accuracy, perplexity, ||Delta||_F per layer."""
    lm = load_model(model_name)
    records = load_counterfact(facts, n)
    requests = to_requests(records)
    base = make_editor(method, lm.model, lm.tok, **(value_overrides or {}))
    t = time.perf_counter()
    values = optimise_values(lm.model, lm.tok, requests, base.state.context_templates, base.hp)
    click.echo(f"target values for {n} edits: {time.perf_counter() - t:.0f} s, mean steps "
               f"{sum(values.steps) / n:.2f}", err=True)
    entity = entity_moments(base, facts, entity_from, entity_keys) if entity_keys else {}
    rows = []
    for override in overrides:
        override = dict(override)
        beta = override.pop("entity_weight", 0.0)
        if beta and not entity:
            raise click.UsageError("entity_weight needs --entity-keys N")
        editor = make_editor(method, lm.model, lm.tok, state=base.state, **override)
        if beta:
            editor.stats = {l: LayerStats(l, s.mom2 + beta * entity[l], s.count) for l, s in editor.stats.items()}
        result = editor.solve_values(requests, values)
        result.delta.apply(lm.model)
        try:
            cf = evaluate_counterfact(lm.model, lm.tok, records, progress=False)
            known = known_fact_accuracy(lm.model, lm.tok)
            ppl = perplexity(lm.model, lm.tok)
        finally:
            result.delta.revert(lm.model)
        fro = [float(torch.linalg.matrix_norm(d.u @ d.v.T)) for d in result.delta.layers]
        rows.append({"override": override, "entity_weight": beta, "es": cf.es, "ps": cf.ps, "ns": cf.ns,
                     "score": cf.score, "known_acc": known, "ppl": ppl, "delta_fro": fro})
        click.echo(json.dumps(rows[-1]))
    return rows


def _json_of(kind: type, extra_keys: frozenset = frozenset()):
    """Click callback: the option as JSON of `kind` (a dict of hyperparameters, or a list of such
    dicts), checked against EditHParams' fields before the model loads; else a one-line usage error."""
    known = set(EditHParams.model_fields) | extra_keys

    def parse(ctx, param, text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
        items = value if kind is list and isinstance(value, list) else [value]
        if not isinstance(value, kind) or not all(isinstance(d, dict) for d in items):
            raise click.BadParameter(f"expected a JSON {'list of objects' if kind is list else 'object'}: {text!r}")
        for d in items:
            if unknown := sorted(set(d) - known):
                raise click.BadParameter(f"unknown hyperparameter {unknown[0]!r} in {text!r}")
        return value
    return parse


@click.command()
@click.option("--facts", default=str(DEFAULT_FACTS), show_default=True, help="CounterFact JSON file.")
@click.option("--n", default=100, help="Edits in the one batch.")
@click.option("--method", default="encore", type=click.Choice(METHODS.names()),
              help="Editor whose defaults the overrides modify.")
@click.option("--model", "model_name", default=DEFAULT_MODEL, help="Model alias, directory or hub name.")
@click.option("--set", "overrides", default="[{}]", callback=_json_of(list, frozenset({"entity_weight"})),
              help="JSON list of hyperparameter overrides.")
@click.option("--entity-keys", default=0, help="Subject keys of this many other records for \"entity_weight\".")
@click.option("--entity-from", default=5000, help="First record of the entity-key pool.")
@click.option("--values", "value_overrides", default="{}", callback=_json_of(dict),
              help="JSON overrides for the value optimisation only.")
def main(facts: str, n: int, method: str, model_name: str, overrides: list, entity_keys: int, entity_from: int,
         value_overrides: dict) -> None:
    """Solve one batch of fixed target values under several hyperparameter overrides."""
    sweep(model_name, facts, n, method, overrides, entity_from, entity_keys, value_overrides)


if __name__ == "__main__":
    main()
