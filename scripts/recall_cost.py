"""What recall of the old answer costs when generating: greedy `generate` (24 new tokens, one prompt at a time, KV
cache) with a workspace's committed memory, its slots' recalled answers on and off, on the feed's fact prompts
(which name edited subjects: recall's extra pass runs) and on prompts naming none (it does not). Medians per round.

    python scripts/recall_cost.py --workspace WS [--feed examples/feed.jsonl] [--rounds 2]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from agent.cli import load_edits
from agent.workspace import Workspace
from editors.models import load_model
from memory.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
OTHER = ["The quick brown fox is", "Water boils at", "The largest ocean is the", "Music is"] * 10


def fact_prompts(feed: Path, n: int = 40) -> list[str]:
    out = []
    for line in feed.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the example feed holds bad lines on purpose
        if isinstance(rec, dict) and "prompt" in rec and "subject" in rec:
            out.append(rec["prompt"].replace("{}", rec["subject"]))
    return out[:n]


def median_seconds(lm, prompts: list[str]) -> float:
    times = []
    for p in prompts:
        x = lm.tok(p, return_tensors="pt")
        t = time.perf_counter()
        lm.model.generate(**x, max_new_tokens=24, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--feed", type=Path, default=ROOT / "examples" / "feed.jsonl")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    ws = Workspace.open(a.workspace)
    lm = load_model(ws.config().model)
    with Ledger(ws.root / "ledger") as ledger:
        memory = load_edits(ledger, lm)
    prompts, answers = fact_prompts(a.feed), dict(memory.answers)
    with memory.attached(lm.model), torch.no_grad():
        median_seconds(lm, prompts[:3])  # warm-up
        for _ in range(a.rounds):
            for label, recalled in (("recall on", answers), ("recall off", {})):
                memory.answers = recalled
                print(f"{label}: fact prompts {median_seconds(lm, prompts) * 1000:.0f} ms, "
                      f"other prompts {median_seconds(lm, OTHER) * 1000:.0f} ms", flush=True)
    print(f"{len(answers)} of {len(memory.slots)} slots recall an answer")


if __name__ == "__main__":
    main()
