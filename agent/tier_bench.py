"""`kagent bench --tiers DIR`: the product's own path on CounterFact records, so that the bench's figures are the
product's - a fresh workspace (`kagent init`), the records as a feed through `kagent watch --once` (the memory tier),
then `kagent consolidate` (compaction into the weights) - and what each step gave: the tier split, how many applied
facts answer with both tiers and with the weights alone (what the HF/GGUF export serves), same-subject specificity
(`kagent check`'s), the compaction's damage readings and rounds, and the time of each step.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.config import AgentConfig
from agent.consolidate import consolidate
from agent.loop import WatchOptions, watch
from agent.session import create_workspace, open_session
from agent.tiers import weights_answer
from agent.views import check_rows
from agent.workspace import Workspace, WorkspaceError
from editors.models import LoadedModel
from evaluators.counterfact import CounterFactRecord, feed_line

log = logging.getLogger(__name__)

FEED_NAME = "bench-feed.jsonl"  # the records as a feed, written beside the workspace


@dataclass
class TierRun:
    """What the product's path did with the bench's records."""

    workspace: str  # the workspace it ran in (kept, for `kagent show/check/export`)
    lines: int  # feed lines (records)
    applied: int  # facts applied after consolidation
    failed: int  # facts the guard failed (they answer in neither tier, and nothing else about them changed)
    watch_seconds: float  # `kagent watch --once`, model already loaded
    facts_per_second: float  # applied facts / watch_seconds
    consolidate_seconds: float  # `kagent consolidate`
    memory_tier: int  # applied facts a slot answers
    weights_tier: int  # applied facts the weights answer with the memory off (they gave up their slots)
    answer_both_tiers: int  # applied facts answering greedily with the memory on
    answer_weights_alone: int  # applied facts answering with the memory off (what a plain checkpoint serves)
    specificity: float | None  # mean share of the edited subjects' other statements kept (kagent check)
    consolidation: str  # `kagent consolidate`'s line
    metrics: dict[str, float] = field(default_factory=dict)  # before_*/after_* probe readings of the consolidation
    rounds: list[dict] = field(default_factory=list)  # the compaction's rounds


def write_feed(path: Path, records: Sequence[CounterFactRecord]) -> Path:
    path.write_text("".join(json.dumps(feed_line(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_tiers(root: Path, records: Sequence[CounterFactRecord], cfg: AgentConfig, loaded: LoadedModel,
              echo: Callable[[str], None] = log.info) -> TierRun:
    """init, watch, consolidate and check in a new workspace at `root` (see the module docstring)."""
    if Workspace(root).exists():
        raise WorkspaceError(f"a workspace already exists at {root}; --tiers needs a new directory")
    ws, _ = create_workspace(root, cfg, loaded)
    feed = write_feed(root.parent / f"{root.name}-{FEED_NAME}", records)
    with ws.writer():
        session = open_session(ws, loaded)
        try:
            t0 = time.perf_counter()
            summary = watch(session, feed, WatchOptions(once=True, batch_size=cfg.batch_size, max_wait=0.0), echo=echo)
            t1 = time.perf_counter()
            echo(summary.line())
            done = consolidate(session)
            t2 = time.perf_counter()
            echo(done.line())
            return tally(session, str(root), len(records), done, t1 - t0, t2 - t1)
        finally:
            session.close()


def tally(session, root: str, lines: int, done, watch_s: float, consolidate_s: float) -> TierRun:
    """The run's figures, read from the session after the consolidation."""
    applied = session.ledger.facts(status="applied")
    tiers = [f.tier or "memory" for f in applied]
    rows = check_rows(session.model, session.tok, applied, session.ledger.probes())  # both tiers on
    kept = [r["specificity"] for r in rows if r["specificity"] is not None]
    with session.editor.memory.suspended():
        alone = sum(weights_answer(session.model, session.tok, applied).values())
    return TierRun(root, lines, len(applied), len(session.ledger.facts(status="failed")), round(watch_s, 1),
                   round(len(applied) / watch_s, 3) if watch_s else 0.0, round(consolidate_s, 1),
                   tiers.count("memory"), tiers.count("weights"), sum(r["took"] for r in rows), alone,
                   round(sum(kept) / len(kept), 4) if kept else None, done.line(), dict(done.metrics),
                   list(done.rounds))


def tier_table(run: TierRun) -> str:
    """The run as `name  value` lines."""
    rows = {k: v for k, v in asdict(run).items() if k not in ("metrics", "rounds")}
    rows |= {k: round(v, 4) for k, v in run.metrics.items() if k.endswith(("known_acc", "perplexity", "took"))}
    rows["rounds"] = len(run.rounds)
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())
