"""The `kagent bench` and `kagent stats` commands (editor benchmark and covariance statistics)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from editors.models import DTYPE_CHOICES
from editors.registry import METHODS


def dtype_option(fn):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                        help="Model dtype (auto: bfloat16 on CUDA, float32 on CPU).")(fn)


def stats_corpus_option(fn):
    return click.option("--stats-corpus", type=click.Path(exists=True, path_type=Path), default=None,
                        help="Text or JSONL file, or a directory of them, for the covariance statistics.")(fn)


def device_map_option(fn):
    return click.option("--device-map", type=click.Choice(["auto"]), default=None,
                        help="Spread the model over the visible GPUs with accelerate (ignores --device).")(fn)


def _overrides(_ctx, _param, pairs: tuple[str, ...]) -> dict:
    """--set KEY=VALUE pairs (JSON values) as a dict; a pair without '=' is a usage error."""
    from evaluators.bench import assignments

    try:
        return assignments(pairs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _methods(_ctx, _param, text: str) -> list[str]:
    """--methods as a list of registered method names; an unknown one is a usage error before anything loads."""
    try:
        return [METHODS.get(name).name for name in text.split(",") if name]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _variants(_ctx, _param, texts: tuple[str, ...]) -> list:
    """--variant rows, checked before anything loads."""
    from evaluators.bench import Variant

    try:
        out = [Variant.parse(t) for t in texts]
        for v in out:
            METHODS.get(v.method)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise click.BadParameter(str(exc).splitlines()[0]) from None
    return out


@click.command()
@click.option("--facts", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help="CounterFact or zsRE JSON file.")
@click.option("--format", "fmt", type=click.Choice(["counterfact", "zsre"]), default="counterfact", show_default=True)
@click.option("--start", type=click.IntRange(0), default=0, show_default=True,
              help="First record to edit (e.g. 5000: records nobody tuned on).")
@click.option("--n", type=int, default=100, show_default=True, help="Edit N records from --start.")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--methods", default=",".join(METHODS.names()), show_default=True, callback=_methods,
              help="Comma-separated editors.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Alias, local HF dir or hub name.")
@click.option("--device", default=None, help="torch device (default: CUDA when available).")
@dtype_option
@device_map_option
@stats_corpus_option
@click.option("--order", type=click.Choice(["arrival", "random", "cluster", "spread"]), default="arrival",
              show_default=True)
@click.option("--set", "sets", multiple=True, callback=_overrides, help="Hyperparameter override KEY=VALUE (JSON values), repeatable.")
@click.option("--consolidate-every", type=click.IntRange(0), default=0, show_default=True,
              help="Re-solve all edits jointly from the base weights every K batches (weights mode; 0 = never).")
@click.option("--variant", "variants", multiple=True, callback=_variants,
              help="A further row 'NAME: KEY=VALUE ...' (method=, order=, consolidate_every= or hyperparameters), "
                   "repeatable; rows with values_on=base share their target values.")
@click.option("--specificity-n", type=click.IntRange(0), default=200, show_default=True,
              help="Edited CounterFact records (a fixed-seed sample) asked about their subjects' other facts and in "
                   "other prompt forms: specificity and reach columns (0: skip).")
@click.option("--known-only", is_flag=True, help="CounterFact: edit only records whose true answer the unedited "
              "model gives first (--start/--n count those).")
@click.option("--forms/--no-forms", default=True, show_default=True,
              help="Train each CounterFact edit on its other forms with its subject's other relations held, as the "
                   "agent does (--no-forms: the edit prompt alone, as before).")
@click.option("--tiers", "tiers_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Instead of editor rows, run the product's path in a new workspace at this directory: init, watch "
                   "the records as a feed (memory tier), consolidate (compaction into the weights); reports the tier "
                   "split, answers with and without the memory, specificity, damage and time (uses --facts, --start, "
                   "--n, --model, --device, --dtype, --stats-corpus, --set, --json; batches as a workspace's config).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
def bench(facts, fmt, start, n, batch_size, methods, model, device, dtype, device_map, stats_corpus, order, sets,
          consolidate_every, variants, specificity_n, known_only, forms, tiers_dir, json_out) -> None:
    """Benchmark editors on sequential edits: quality, side effects and speed."""
    from editors.models import pick_device
    from evaluators.bench import BenchConfig, run_bench, table

    pick_device(device)  # a device this machine lacks is a one-line error before anything loads
    if tiers_dir is not None:
        if fmt != "counterfact" or known_only:
            raise click.UsageError("--tiers runs CounterFact records --start..--start+--n (no --known-only, no zsRE)")
        tiers(tiers_dir, facts, start, n, model, device, dtype, stats_corpus, sets, json_out)
        return
    cfg = BenchConfig(facts=facts, format=fmt, start=start, n=n, batch_size=batch_size, methods=methods,
                      model=model, device=device, dtype=dtype, device_map=device_map, stats_corpus=stats_corpus,
                      order=order, overrides=sets, consolidate_every=consolidate_every, variants=variants,
                      specificity_n=specificity_n, known_only=known_only, forms=forms)

    def save(rows) -> None:  # after every row: a run of hours that dies keeps what it finished
        if json_out:
            json_out.write_text(json.dumps([r.model_dump() for r in rows], indent=2))

    rows = run_bench(cfg, on_row=save)
    click.echo(table(rows))
    if json_out:
        click.echo(f"wrote {json_out}")


def tiers(root: Path, facts: Path, start: int, n: int, model: str, device: str | None, dtype: str,
          stats_corpus: Path | None, sets: dict, json_out: Path | None) -> None:
    """`bench --tiers`: the product's path (agent/tier_bench.py) on records start..start+n-1 (those holding none of
    the guard's probe facts)."""
    from dataclasses import asdict

    from agent.config import checked_config
    from agent.tier_bench import run_tiers, tier_table
    from editors.models import load_model
    from evaluators.bench import edit_set
    from evaluators.counterfact import load_counterfact

    records = edit_set(load_counterfact(facts)[start:], n, "counterfact", facts)
    cfg = checked_config(dict(model=model, device=device or "auto", dtype=dtype, editor=sets,
                              stats_corpus=str(stats_corpus.resolve()) if stats_corpus else ""), "kagent bench --tiers")
    run = run_tiers(root.resolve(), records, cfg, load_model(model, **cfg.load_options()), echo=click.echo)
    click.echo(tier_table(run))
    if json_out:
        json_out.write_text(json.dumps(asdict(run), indent=2))
        click.echo(f"wrote {json_out}")


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--method", default="encore", show_default=True, type=click.Choice(METHODS.names()),
              help="Whose default layers to use.")
@click.option("--layers", default=None, help="Comma-separated layers (default: the method's).")
@click.option("--tokens", type=int, default=None, help="Corpus tokens (default: the method's).")
@click.option("--device", default=None, help="torch device (default: CUDA when available).")
@dtype_option
@stats_corpus_option
def stats(model, method, layers, tokens, device, dtype, stats_corpus) -> None:
    """Compute (once, cached) and show the covariance statistics of the edited layers."""
    import torch

    from editors.models import load_model
    from editors.registry import hparams_for
    from editors.stats import default_corpus, layer_stats
    from editors.user_corpus import UserCorpus

    lm = load_model(model, device, dtype)
    over = {"layers": [int(x) for x in layers.split(",")]} if layers else {}
    over |= {"stats_tokens": tokens} if tokens else {}
    hp = hparams_for(method, lm.model.config, **over)
    corpus = UserCorpus(stats_corpus) if stats_corpus else default_corpus()
    for layer, st in layer_stats(lm.model, lm.tok, hp.layers, corpus, hp.stats_tokens).items():
        ev = torch.linalg.eigvalsh(st.mom2)
        click.echo(f"layer {layer}: {st.count} tokens, dim {st.mom2.shape[0]}, trace {st.mom2.trace():.4g}, "
                   f"eigenvalues {ev[0]:.3g}..{ev[-1]:.3g}, below 1e-2: {(ev < 1e-2).sum().item()}")
