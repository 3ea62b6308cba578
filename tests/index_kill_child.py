"""Child side of tests/test_index_kill.py (not a test module): imports kagent once, then for each job forks a run of
`agent.intake.intake` over a feed into a ledger + fact index that SIGKILLs itself at a named point, and forks the
recovery run that reads the rest of the feed. Prints one JSON line per job.

    python tests/index_kill_child.py JOBS.json     (a list of {"phase", "dir", "feed", "hit"})
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

from agent.feed import FeedFollower
from agent.intake import intake, resume_position
from memory.index import FactIndex
from memory.ledger import Ledger
from memory.vectors import VectorLog


def _feedbench():
    """scripts/feedbench.py, imported from its file (conftest's load_script would import transformers: seconds)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "feedbench.py"
    spec = importlib.util.spec_from_file_location("scripts_feedbench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HashEmbedder = _feedbench().HashEmbedder


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, hit: int) -> None:
    """Kill this process at the `hit`-th time `phase` is reached."""
    import agent.intake

    seen = {"n": 0}

    def reached() -> bool:
        seen["n"] += 1
        return seen["n"] == hit

    def wrap(owner, name: str, when: str):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if when == "before" and reached():
                die()
            out = real(*args, **kwargs)
            if when == "after" and reached():
                die()
            return out
        setattr(owner, name, wrapper)

    if phase == "torn-record":  # half of a chunk's records written, then killed
        real_append = VectorLog.append

        def torn(self, position, ids, vecs):
            if not reached():
                return real_append(self, position, ids, vecs)
            real_append(self, position, ids[:1], vecs[:1])
            with open(self.path, "r+b") as fh:
                fh.truncate(fh.seek(0, 2) - 5)  # the record's last bytes never reached the file
            die()
        VectorLog.append = torn
        return
    owner, name, when = {
        "log-appended": (VectorLog, "append", "after"),  # inside the chunk's transaction, COMMIT not issued
        "chunk-committed": (agent.intake, "store_chunk", "after"),  # committed, no snapshot taken
        "index-renamed": (FactIndex, "_write_meta", "before"),  # new snapshot file, previous meta
        "meta-written": (VectorLog, "clear", "before"),  # snapshot and meta written, the log not restarted
    }[phase]
    wrap(owner, name, when)


def run(workdir: Path, feed: Path) -> dict:
    """Read the whole feed (from the stored position) into the ledger and fact index in `workdir`."""
    ledger = Ledger(workdir / "ledger")
    fact_index = FactIndex(ledger, HashEmbedder(), index_path=workdir / "facts.faiss")
    embedded = {"n": 0}
    real = fact_index._embed_ids

    def counting(ids):
        embedded["n"] += len(ids)
        real(ids)
    fact_index._embed_ids = counting
    with FeedFollower(resume_position(ledger, feed)) as follower:
        stats = intake(fact_index, follower, final=True)
    ledger.close()
    return {"lines": stats.lines, "added": stats.added, "reembedded": embedded["n"]}


def fork(fn) -> int:
    """Run fn() in a child; return its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def job(spec: dict) -> dict:
    workdir, feed = Path(spec["dir"]), Path(spec["feed"])
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"phase": spec["phase"]}
    if spec["phase"] != "none":
        status = fork(lambda: (arm(spec["phase"], spec["hit"]), run(workdir, feed)))
        out["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    result = workdir / "recovery.json"
    fork(lambda: result.write_text(json.dumps(run(workdir, feed))))
    return out | json.loads(result.read_text())


if __name__ == "__main__":
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        print(json.dumps(job(spec)), flush=True)
