"""Write CounterFact records start..start+n-1 as a kagent feed (JSONL), to run `kagent watch` on facts nobody tuned on.

    python scripts/cf_feed.py --start 6000 --n 200 --out runs/cf-6000-6199.jsonl

Each record becomes one fact: subject, prompt, target (target_new), old_target (ground_truth), its rephrase as a
paraphrase and its locality prompt as a neighbour; `id` is "cf-<case_id>".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluators.counterfact import CounterFactRecord, feed_line

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/cf_feed.py", description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=Path, default=DATA, help="CounterFact JSON (default: ../shared/data beside the repo)")
    ap.add_argument("--start", type=int, default=6000, help="first record (records nobody tuned on: 5000 and up)")
    ap.add_argument("--n", type=int, default=200, help="records")
    ap.add_argument("--out", type=Path, required=True, help="feed file to write")
    args = ap.parse_args(argv)
    records = json.loads(args.facts.read_text())[args.start:args.start + args.n]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(feed_line(CounterFactRecord.model_validate(r)), ensure_ascii=False) for r in records)
    args.out.write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
