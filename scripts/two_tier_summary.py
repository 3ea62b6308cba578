"""Summarise a `scripts/two_tier_run.sh` directory: per workspace the tier split, answers, known facts, perplexity,
same-subject specificity, the compaction's rounds and the wall times.

    python scripts/two_tier_summary.py OUT_DIR
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROUND_KEYS = ("facts", "answered", "over", "known_acc", "perplexity", "norm_growth", "specificity", "memory_specificity",
              "unspecific", "seconds")
RESULT_KEYS = ("before_known_acc", "after_known_acc", "before_perplexity", "after_perplexity", "after_norm_growth",
               "after_interference", "after_specificity", "after_memory_specificity", "compaction_seconds")


def read_json(path: Path):
    text = path.read_text() if path.exists() else ""
    return json.loads(text) if text.strip() else None


def specificity(rows) -> tuple[float | None, int]:
    vals = [r["specificity"] for r in rows or [] if r.get("specificity") is not None]
    return (round(statistics.mean(vals), 3) if vals else None), len(vals)


def wall(log: Path) -> str | None:
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log.read_text()) if log.exists() else None
    return m.group(1) if m else None


def rounded(row: dict, keys) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k in keys}


def main(d: Path) -> None:
    memory = read_json(d / "check-memory.json") or []
    print("memory tier:", {"facts": len(memory), "answer": sum(r["took"] for r in memory),
                           "specificity": specificity(memory), "watch wall": wall(d / "watch.log")})
    for w in sorted(p.name for p in d.glob("consolidate-*.json")):
        name = w.removeprefix("consolidate-").removesuffix(".json")
        done, check = read_json(d / w), read_json(d / f"check-{name}.json")
        if done is None:
            print(name, "no result")
            continue
        print(name, {"tiers": done.get("tiers"), "kept_chain": done.get("kept_chain"),
                     **rounded(done.get("metrics", {}), RESULT_KEYS),
                     "check": None if check is None else (sum(r["took"] for r in check), specificity(check)),
                     "wall": wall(d / f"consolidate-{name}.log")})
        for r in done.get("rounds", []):
            print("   round", rounded(r, ROUND_KEYS))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
