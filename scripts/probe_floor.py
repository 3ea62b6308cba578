"""Measure the guard's damage measure on the real model: probe time, the random-update floor against the update
norm, and the damage real ENCORE batches cause against that floor (BENCHMARKS.md, "Probe damage with a noise floor").

Edits CounterFact train records 0..N-1 (tuning records; the probe set holds none of their subjects) with ENCORE:
  1. timing of one margin pass over the probe set;
  2. batches of `--batch-size` applied one after another; for each, the margins before and after, perplexity, the
     40 known facts (the old rule) and `--draws` random updates with the batch's own per-layer norms and rank,
     each applied to the model just before the batch (a fresh floor per batch);
  3. one batch of `--big` facts on the unedited model, with its own random draws;
  4. the floor's scaling law on the unedited model: random updates at `--scales` times the mean per-layer norm
     profile of the small batches, `--scale-draws` each (rank = batch size), plus dense ones at scale 1.
Every pass records four margin definitions per fact (mean over answer tokens of the logit margin, first token's
margin, the least token's margin, summed log-probability) so they can be compared on the same edits.
ENCORE deltas are cached in `--cache` (rerunning reuses them). Writes one JSON file.

Run: python scripts/probe_floor.py --out runs/probe_floor.json
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import click
import torch
from safetensors.torch import load_file, save_file

from editors.corpus import heldout_text
from editors.delta import EditDelta
from editors.models import DEFAULT_MODEL, load_model
from editors.registry import make_editor
from evaluators.counterfact import load_counterfact, to_requests
from evaluators.probes.answers import known_fact_accuracy
from evaluators.probes.damage import MARGIN_BATCH, damage, fact_margins, layer_norms_of, random_update
from evaluators.probes.facts import load_known_facts, load_probe_facts
from evaluators.probes.perplexity import perplexity
from evaluators.scoring import answer_margins

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
KINDS = ("mean", "first", "min", "logprob")


def margins_all(model, tok, facts) -> dict[str, torch.Tensor]:
    """The four margin definitions per fact from one teacher-forced pass."""
    m, lp = answer_margins(model, tok, [f.prompt for f in facts], [f.target for f in facts],
                           batch_size=MARGIN_BATCH)
    return {"mean": torch.stack([x.double().mean() for x in m]), "first": torch.stack([x[0].double() for x in m]),
            "min": torch.stack([x.double().min() for x in m]), "logprob": torch.stack([x.double().sum() for x in lp])}


class Meter:
    """Reads margins (all four definitions), perplexity and known-fact accuracy of one model."""

    def __init__(self, lm, facts, known, ppl_text, ppl_tokens):
        self.lm, self.facts, self.known, self.text, self.tokens = lm, facts, known, ppl_text, ppl_tokens

    def read(self, known: bool = True) -> dict:
        model, tok = self.lm.model, self.lm.tok
        out = {"margins": margins_all(model, tok, self.facts),
               "ppl": perplexity(model, tok, self.text, max_tokens=self.tokens, window=256)}
        if known:
            out["known_acc"] = known_fact_accuracy(model, tok, self.known)
        return out


def write(out: Path, report: dict) -> None:
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")


def damages(before: dict, after: dict) -> dict:
    return {k: vars(damage(before["margins"][k], after["margins"][k])) for k in KINDS}


def random_reads(meter: Meter, before: dict, norms: dict[int, float], draws: int, rank: int, seed: int) -> list[dict]:
    """Damage and perplexity of `draws` random updates with per-layer norms `norms`, each applied and reverted."""
    out = []
    for d in range(draws):
        delta = random_update(meter.lm.model, norms, torch.Generator().manual_seed(seed + d), rank)
        delta.apply(meter.lm.model)
        try:
            after = meter.read(known=False)
        finally:
            delta.revert(meter.lm.model)
        out.append({"damage": damages(before, after), "ppl": after["ppl"], "rank": rank, "seed": seed + d})
    return out


def cached_compute(editor, requests, path: Path) -> tuple[EditDelta, dict[int, torch.Tensor]]:
    """ENCORE's delta and keys for `requests` on the model as it is (cached under `path`)."""
    keys_path = path.with_suffix(".keys.safetensors")
    if path.exists() and keys_path.exists():
        return EditDelta.load(path), {int(k): v for k, v in load_file(str(keys_path)).items()}
    result = editor.compute(requests, progress=True)
    result.delta.save(path)
    save_file({str(k): v.contiguous() for k, v in result.keys.items()}, str(keys_path))
    return result.delta, result.keys


@click.command()
@click.option("--train", "train_path", type=click.Path(exists=True, path_type=Path), default=DEFAULT_TRAIN,
              show_default=True)
@click.option("--n", default=30, show_default=True, help="CounterFact train records 0..n-1 edited")
@click.option("--batch-size", default=10, show_default=True)
@click.option("--big", default=0, show_default=True, help="size of the one large batch (0 = skip)")
@click.option("--draws", default=2, show_default=True, help="random updates per real batch")
@click.option("--scales", default="0.5,1,2", show_default=True)
@click.option("--scale-draws", default=2, show_default=True)
@click.option("--ppl-tokens", default=1024, show_default=True, help="held-out tokens (the guard's default)")
@click.option("--threads", default=1, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/probe_floor_cache"),
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/probe_floor.json"),
              show_default=True)
def main(train_path, n, batch_size, big, draws, scales, scale_draws, ppl_tokens, threads, cache, out) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm = load_model(DEFAULT_MODEL)
    facts = load_probe_facts()
    known = load_known_facts()[:40]
    meter = Meter(lm, facts, known, heldout_text()[: ppl_tokens * 8], ppl_tokens)
    editor = make_editor("encore", lm.model, lm.tok)
    report: dict = {"facts": len(facts), "threads": threads, "load_avg_start": os.getloadavg()}

    t = time.perf_counter()
    fact_margins(lm.model, lm.tok, facts)
    margin_s = time.perf_counter() - t
    t = time.perf_counter()
    meter.read(known=False)
    report["timing"] = {"margin_pass_s": margin_s, "margins_and_ppl_s": time.perf_counter() - t,
                        "load_avg": os.getloadavg()}
    log.info("timing %s", report["timing"])

    base = meter.read()
    report["base"] = {"ppl": base["ppl"], "known_acc": base["known_acc"],
                      "margin_quantiles": {k: torch.quantile(base["margins"][k], torch.tensor(
                          [0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist() for k in KINDS}}
    records = load_counterfact(train_path, n)
    reqs = to_requests(records)

    # 2. sequential small batches
    batches, applied, before = [], [], base
    for b, start in enumerate(range(0, n, batch_size)):
        group = reqs[start: start + batch_size]
        delta, keys = cached_compute(editor, group, cache / f"seq{batch_size}-b{b}.safetensors")
        norms = layer_norms_of(delta)
        rand = random_reads(meter, before, norms, draws, len(group), seed=1000 * (b + 1))
        delta.apply(lm.model)
        editor.state.add_keys(keys)
        applied.append(delta)
        after = meter.read()
        row = {"batch": b, "records": [start, start + len(group)], "norms": norms, "damage": damages(before, after),
               "ppl_before": before["ppl"], "ppl_after": after["ppl"], "known_acc_after": after["known_acc"],
               "random": rand}
        batches.append(row)
        log.info("batch %d: damage %.4f +- %.4f, random %s, ppl %.3f -> %.3f, known %.3f", b,
                 row["damage"]["mean"]["mean"], row["damage"]["mean"]["se"],
                 [round(r["damage"]["mean"]["mean"], 4) for r in rand], before["ppl"], after["ppl"],
                 after["known_acc"])
        before = after
        write(out, report | {"batches": batches})
    report["batches"] = batches
    for delta in reversed(applied):
        delta.revert(lm.model)
    editor.state.kkt.clear()
    editor.state.n_edits = 0

    # 4. scaling law on the unedited model (before the big batch: it needs only the small batches' norms)
    layers = sorted(batches[0]["norms"])
    profile = {l: sum(r["norms"][l] for r in batches) / len(batches) for l in layers}
    scaling = []
    for s in [float(x) for x in scales.split(",")]:
        norms = {l: s * v for l, v in profile.items()}
        scaling.append({"scale": s, "norms": norms,
                        "random": random_reads(meter, base, norms, scale_draws, batch_size, seed=int(1e6 * s))})
        log.info("scale %g: %s", s, [round(r["damage"]["mean"]["mean"], 4) for r in scaling[-1]["random"]])
        write(out, report | {"scaling": scaling})
    report["scaling"] = scaling
    report["dense"] = random_reads(meter, base, profile, scale_draws, 0, seed=77)
    write(out, report)

    # 3. one big batch on the unedited model
    if big:
        delta, _ = cached_compute(editor, reqs[:big], cache / f"big{big}.safetensors")
        norms = layer_norms_of(delta)
        rand = random_reads(meter, base, norms, draws, big, seed=99)
        delta.apply(lm.model)
        after = meter.read()
        delta.revert(lm.model)
        report["big"] = {"n": big, "norms": norms, "damage": damages(base, after), "ppl_after": after["ppl"],
                         "known_acc_after": after["known_acc"], "random": rand}
        log.info("big batch: damage %s random %s", report["big"]["damage"]["mean"],
                 [r["damage"]["mean"]["mean"] for r in rand])
    report["load_avg_end"] = os.getloadavg()
    write(out, report)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
