"""Feed ingestion RAM benchmark: does reading a long feed keep RAM bounded?

    python scripts/feedbench.py --lines 10000,100000 [--stage read,intake] [--distinct N] [--tracemalloc]
                                [--json out.json]

For each line count a feed is generated (about 90% new facts, 4% re-sent duplicates, 3% updates of an earlier
subject, 3% bad lines of several kinds) and each stage runs in a fresh child process, so peak RSS belongs to that
stage alone:

- `read`: `FeedFollower` + `agent.intake.parse` over the whole file (reading and validation, nothing stored);
- `intake`: `agent.intake.intake` into a fresh ledger and fact index (SQLite + FAISS), as `kagent watch` does
  before batching; the embedder is a 64-dim hashed-trigram one, so the model and MiniLM are not measured.

`--distinct N` makes every valid line a re-send of one of N facts, so the stores stop growing after N facts and
only the length of the file changes.

Reported per run: peak RSS over the run minus RSS before it (what the stage added) and the time; with
`--tracemalloc`, also the tracemalloc peak of Python allocations, from a second run (tracemalloc slows the
stage about 3x and its bookkeeping inflates RSS). The stores grow by design (every fact stays in the ledger and
its vector in the FAISS index, which lives in RAM); the question is whether anything else grows with the
file, so the intake stage also reports the index's serialised size and the RSS still held once the index is
let go.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import psutil

from editors.footprint import peak_mb, reset_peak, resident_mb

STAGES = ("read", "intake")
BAD_KINDS = [
    "{not json",
    '{"subject": "X", "prompt": "{} is in"}',  # target missing
    '{"subject": "", "prompt": "{} is in", "target": "Y"}',  # blank subject
    '{"subject": "X", "prompt": "no placeholder", "target": "Y"}',
    '{"subject": "X", "prompt": "{} is in", "target": "Y", "colour": "red"}',  # unknown field
    "[1, 2, 3]",
    '{"subject": 7, "prompt": "{} is in", "target": "Y"}',
]


class HashEmbedder:
    """64-dim hashed character trigrams, L2-normalised: a stand-in embedder with no model."""

    name = "hash-trigram-64"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), 64), 1e-6, dtype=np.float32)
        for i, t in enumerate(texts):
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j:j + 3].encode("utf-8", "surrogatepass")) % 64] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def feed_line(i: int, distinct: int | None = None) -> str:
    """Line i of the benchmark feed (deterministic); with `distinct`, every valid line is one of the first
    `distinct` facts, re-sent."""
    r = zlib.crc32(i.to_bytes(8, "little")) % 100
    if r < 3:
        return BAD_KINDS[i % len(BAD_KINDS)]
    if distinct:
        return feed_line_fact(i % distinct)
    if r < 7 and i > 10:  # re-sent: the same fact as an earlier line
        return feed_line_fact(i // 2)
    if r < 10 and i > 10:  # update: an earlier subject, same relation, a new target
        return json.dumps({"subject": f"Place {i // 3:06d}", "prompt": "{} is located in", "target": f"Region {i}"})
    return feed_line_fact(i)


def feed_line_fact(i: int) -> str:
    relation = ("{} is located in", "The capital of {} is", "{} was founded by")[i % 3]
    return json.dumps({"subject": f"Place {i:06d}", "prompt": relation, "target": f"Region {i % 997}"})


def write_feed(path: Path, lines: int, distinct: int | None = None) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(feed_line(i, distinct) + "\n")


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def run_stage(stage: str, feed: Path, work: Path, trace: bool = False) -> dict:
    """One stage over `feed`, in this process; RAM is measured from just before it starts. With `trace`,
    tracemalloc runs too (its bookkeeping inflates RSS, so RSS figures come from a run without it)."""
    from agent.feed import FeedFollower, FeedPosition
    from agent.intake import intake, parse
    from memory.index import FactIndex
    from memory.ledger import Ledger
    from memory.record import BadRecord

    ledger = fact_index = None
    if stage == "intake":
        ledger = Ledger(work / "ledger")
        fact_index = FactIndex(ledger, HashEmbedder(), index_path=work / "facts.faiss")
        fact_index.index()
    rss0 = resident_mb()  # garbage collected and freed heap given back first
    reset = reset_peak()
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {"stage": stage}
    with FeedFollower(FeedPosition(str(feed))) as follower:
        if stage == "read":
            good = bad = 0
            for item in follower.read(final=True):
                if isinstance(parse(item), BadRecord):
                    bad += 1
                else:
                    good += 1
            out |= {"lines": good + bad, "valid": good, "bad": bad}
        else:
            stats = intake(fact_index, follower, final=True)
            out |= {"lines": stats.lines, "added": stats.added, "duplicates": stats.duplicates,
                    "superseding": stats.superseding, "bad": len(stats.bad)}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if trace:
        out["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
    out |= {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_added_mb": round(peak_mb() - rss0, 1),
            "rss_added_mb": round(_rss_mb() - rss0, 1), "peak_since": "stage" if reset else "process"}
    if stage == "intake":
        import faiss

        index = fact_index.index()
        out |= {"index_vectors": index.ntotal, "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1),
                "ledger_db_mb": round((work / "ledger" / "ledger.db").stat().st_size / 2**20, 1)}
        fact_index.release_index()  # what is left once the index is let go
        del index
        ledger.close()
        out["rss_kept_without_index_mb"] = round(resident_mb() - rss0, 1)
    return out


def measure(lines: int, stage: str, tmp: Path, distinct: int | None = None, trace: bool = False) -> dict:
    """Run one stage over a `lines`-line feed in a fresh child process (and, with `trace`, once more under
    tracemalloc); return its figures."""
    feed = tmp / f"feed-{lines}-{distinct}.jsonl"
    if not feed.exists():
        write_feed(feed, lines, distinct)
    out = _child(stage, feed, tmp / f"work-{stage}-{feed.stem}-0", "0")
    if trace:
        traced = _child(stage, feed, tmp / f"work-{stage}-{feed.stem}-1", "1")
        out["tracemalloc_peak_mb"] = traced["tracemalloc_peak_mb"]
    return out | {"feed_mb": round(feed.stat().st_size / 2**20, 1), "distinct": distinct}


def _child(stage: str, feed: Path, work: Path, trace: str) -> dict:
    work.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, str(feed), str(work), trace]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{stage} on {feed.name} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| stage | lines | feed MB | valid / new facts | bad | peak RSS added MB | tracemalloc peak MB | "
            "index MB (serialised) | RSS kept without the index MB | seconds |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        stage = r["stage"] + (f" ({r['distinct']} distinct facts)" if r.get("distinct") else "")
        out.append(f"| {stage} | {r['lines']} | {r['feed_mb']} | {r.get('valid', r.get('added'))} | {r['bad']} | "
                   f"{r['peak_rss_added_mb']} | {r.get('tracemalloc_peak_mb', '-')} | {r.get('index_mb', '-')} | "
                   f"{r.get('rss_kept_without_index_mb', '-')} | {r['seconds']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/feedbench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default="10000,100000", help="comma-separated feed lengths")
    ap.add_argument("--stage", default=",".join(STAGES), help="comma-separated stages: read, intake")
    ap.add_argument("--distinct", type=int, help="valid lines are re-sends of this many facts (default: all new)")
    ap.add_argument("--tracemalloc", action="store_true", help="also measure the tracemalloc peak (a second run)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=4, metavar=("STAGE", "FEED", "WORK", "TRACE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        stage, feed, work, trace = args.child
        print(json.dumps(run_stage(stage, Path(feed), Path(work), trace == "1")))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="feedbench-") as tmp:
        for stage in args.stage.split(","):
            for n in (int(x) for x in args.lines.split(",")):
                rows.append(measure(n, stage, Path(tmp), args.distinct, args.tracemalloc))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
