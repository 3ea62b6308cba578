"""Calibrate the batch RAM estimate (editors/footprint.py) against measured peak RSS on a real model.

    python scripts/ram_calibration.py [--cases 1x50s,1x200s,1x400s,1x400p,16x10s,10x60s] [--model smollm2-135m]
                                         [--json out.json]

A case `NxWp` is N edits whose prompt carries W filler words, placed after the subject (`s`: the suffix the value
optimisation recomputes with gradients grows) or before it (`p`: the prefix grows). Each case runs in a fresh child
process: load the model and the ENCORE editor (cached statistics), page the weights in, measure resident RAM,
reset the kernel's peak mark (VmHWM), run `Editor.compute` (two value steps, so one forward and backward pass at
full size, then keys and solve) and score the batch's prompts as the retention probe does; then, as `kagent watch`
does after applying a batch, the superposition statistics and the downstream probes (known facts, held-out
perplexity) with the default probe settings. Reported per case: the tokens of the longest prompt, resident RAM
before, the edit's measured peak added and its estimate (calibrated and as counted), measured / estimated, what
the process keeps after the compute, and the probes' peak added over the same base with the agent's estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_CASES = "1x50s,1x200s,1x400s,1x400p,16x10s,10x60s"


def requests_for(case: str):
    from editors.prompts import EditRequest

    n, rest = case.split("x")
    words, where = int(rest[:-1]), rest[-1]
    filler = " ".join(["story"] * words)
    prompt = "{} is " + filler + " in" if where == "s" else filler + " {} is in"
    return [EditRequest(prompt, f"Town{i}", "Chile") for i in range(int(n))]


def measure(case: str, model: str) -> dict:
    """One case in this process (run it in a fresh one: the peak mark is per process)."""
    import torch

    from agent.budget import probes_mb
    from agent.config import AgentConfig
    from editors.footprint import (CALIBRATION, SLACK_MB, Dims, edit_tokens, estimate, page_in, peak_mb, reset_peak,
                                   resident_mb)
    from editors.models import load_model
    from editors.registry import make_editor
    from evaluators.monitors.superposition import superposition_metrics
    from evaluators.probes.answers import retention
    from evaluators.probes.suite import ProbeSuite

    lm = load_model(model)
    editor = make_editor("encore", lm.model, lm.tok, max_steps=2, stop="nll", nll_stop=-1.0)
    cfg, reqs, dims = AgentConfig(), requests_for(case), Dims.of(lm.model)
    est = estimate(dims, [edit_tokens(lm.tok, r, editor.state.context_templates, editor.hp) for r in reqs], editor.hp)
    suite = ProbeSuite.shipped(cfg.probe_facts, cfg.probe_tokens)
    page_in(lm.model)
    before = resident_mb()
    reset_peak()
    t0 = time.perf_counter()
    result = editor.compute(reqs)
    retention(lm.model, lm.tok, reqs, whole_answer=True)
    added = peak_mb() - before
    kept = resident_mb() - before  # what the process holds on to after the compute
    reset_peak()
    superposition_metrics(result.keys, {}, {layer: st.mom2 for layer, st in editor.stats.items()})
    suite.downstream(lm.model, lm.tok)
    probes_added = peak_mb() - before
    return {"case": case, "edits": len(reqs), "prompt_tokens": len(lm.tok(reqs[0].text())["input_ids"]),
            "threads": torch.get_num_threads(), "resident_before_mb": round(before), "peak_added_mb": round(added),
            "estimate_mb": round(est.working_mb), "counted_mb": round((est.working_mb - SLACK_MB) / CALIBRATION),
            "phases_mb": [round(est.values_mb), round(est.keys_mb), round(est.probes_mb)],
            "measured_over_estimate": round(added / est.working_mb, 3), "kept_after_compute_mb": round(kept),
            "probes_added_mb": round(probes_added), "probes_estimate_mb": round(probes_mb(dims, cfg)),
            "seconds": round(time.perf_counter() - t0, 1)}


def child(case: str, model: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--model", model]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    out = ["| case | edits | prompt tokens | resident before MB | edit peak added MB | estimate MB (values/keys/probes) "
           "| counted MB | measured / estimate | kept after MB | agent probes peak added MB (estimate) | seconds |",
           "|" + "---|" * 11]
    for r in rows:
        v, k, p = r["phases_mb"]
        out.append(f"| {r['case']} | {r['edits']} | {r['prompt_tokens']} | {r['resident_before_mb']} | "
                   f"{r['peak_added_mb']} | {r['estimate_mb']} ({v}/{k}/{p}) | {r['counted_mb']} | "
                   f"{r['measured_over_estimate']} | {r['kept_after_compute_mb']} | {r['probes_added_mb']} "
                   f"({r['probes_estimate_mb']}) | {r['seconds']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/ram_calibration.py", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated NxW{s,p} cases")
    ap.add_argument("--model", default="smollm2-135m", help="alias, local HF dir or hub name")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.model)))
        return
    rows = []
    for case in args.cases.split(","):
        rows.append(child(case, args.model))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
