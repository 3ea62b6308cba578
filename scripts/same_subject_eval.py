"""Same-subject specificity and reach per prompt form of an export (or of the unedited model against itself).

    python scripts/same_subject_eval.py --facts ../shared/data/counterfact/counterfact-val.json --n 100
    python scripts/same_subject_eval.py --facts FILE --start S --n N --export ./edited-model [--json out.json]

`--export DIR` (a `kagent export` of a workspace that edited CounterFact records START..START+N-1, e.g. fed by
`scripts/cf_feed.py`): the unedited state is the exported checkpoint alone, the edited one the same with its entity
memory attached (`editors.entity_memory.load_exported`). Edits written to the weights are in both states, so this
measures the memory tier only. Without `--export` both states are the unedited model (`--model`): every figure of
specificity must be 1.0 and reach/native are the unedited model's. The figures are those of
`evaluators.specificity` (see its docstring); `--show K` prints the first K facts' changed statements, `--json` writes
the figures and every fact's prompts with both answers.

Hold-out rule (issue 26): tune on counterfact-train (records 0-999); report on counterfact-val.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editors.models import load_model  # noqa: E402
from evaluators.counterfact import load_counterfact  # noqa: E402
from evaluators.specificity import EditCase, SpecificityConfig, measure  # noqa: E402


def states(args, lm):
    """(unedited, edited) context factories."""
    if not args.export:
        return contextlib.nullcontext, contextlib.nullcontext
    from editors.entity_memory import load_exported

    return contextlib.nullcontext, lambda: load_exported(args.export, lm.model, lm.tok)


def report(res, seconds: float) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"facts {res.n_facts}, statements {res.n_statements} (sure {res.n_sure}), {seconds:.0f} s",
             f"specificity_all {f(res.specificity_all)}  specificity_sure {f(res.specificity_sure)}  "
             f"neighbours_unchanged {f(res.neighbours_unchanged)}",
             f"{'form':<11}{'prompts':>8}{'reach':>8}{'native':>8}{'ratio':>8}"]
    lines += [f"{form:<11}{res.form_counts[form]:>8}{f(res.reach[form]):>8}{f(res.native.get(form)):>8}"
              f"{f(res.ratio.get(form)):>8}" for form in res.reach]
    return "\n".join(lines)


def show(res, k: int) -> None:
    for fact in res.facts[:k]:
        print(f"\n{fact.subject} [{fact.relation}] -> {fact.target_new} (was {fact.ground_truth})")
        for s in fact.statements:
            mark = "  " if s.same else "!!"
            print(f"  {mark} {s.prompt!r}: {s.before!r} -> {s.after!r} (p {s.p_before:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=Path, default=ROOT.parent / "shared/data/counterfact/counterfact-val.json")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--export", type=Path, default=None, help="kagent export directory (model + entity memory)")
    ap.add_argument("--model", default="smollm2-135m", help="model without --export")
    ap.add_argument("--per-relation", type=int, default=1, help="test templates per other relation")
    ap.add_argument("--show", type=int, default=0, help="print the first K facts' statements")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(str(args.export) if args.export else args.model)
    records = load_counterfact(args.facts)[args.start: args.start + args.n]
    cases = [EditCase.from_counterfact(r) for r in records]
    unedited, edited = states(args, lm)
    t = time.perf_counter()
    res = measure(lm.model, lm.tok, cases, unedited, edited, cfg=SpecificityConfig(per_relation=args.per_relation))
    print(report(res, time.perf_counter() - t))
    show(res, args.show)
    if args.json:
        args.json.write_text(json.dumps(asdict(res), indent=1, ensure_ascii=False))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
