"""Crash and corruption reliability: `kagent watch FEED --once` (and `kagent rollback --to`) run in a separate
process on a tiny-model workspace and are SIGKILLed, at random times and at named phases; after every kill the
workspace is reopened and checked: every feed line up to the stored offset is one fact (none lost, none stored
twice), every applied fact is in exactly one committed batch, `Ledger.verify()` passes and the weights a reload
gives equal the base weights plus the committed delta files. Then a full disk while a batch's files are written,
and corruption: altered / truncated / deleted delta files, a deleted FAISS index, an older schema and a workspace
made by a different model.

The kagent processes are forked from a "zygote" subprocess that has imported torch, transformers and kagent and
loaded the tiny model once (transformers imports most of itself lazily, on first load: 4 s of a 4.3 s run), so a
run takes well under a second; each child runs the real click CLI and is killed by its pid. Random kills land
uniformly over 1.1 times the length of a whole run. Phase kills need no hook in kagent: the child wraps one of
kagent's functions from the test side (`test_reliability_support.arm`), stops itself with SIGSTOP when it gets
to the phase (between the delta file and the keys file, before the COMMIT of a batch, inside value optimisation,
between two rollbacks, ...) and is SIGKILLed there.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from agent.workspace import Workspace
from editors.delta import EditDelta
from memory.ledger import MIGRATIONS, Ledger, LedgerError, LedgerMismatch
from memory.model_sync import check_model, load_into
from test_reliability_support import (LAYERS, PHASES, STOP_MARK, Phase, _patched, base_layers, committed_weights,
                                      max_rel_err, one_thread, run, shared_workspace)

log = logging.getLogger(__name__)

# FAKE for this module and its forked kagent processes (conftest.every_fact_answers): every fact answers. The tiny
# random model cannot answer an edited fact; what is tested is that kills and corruption never lose or double data.
pytestmark = pytest.mark.usefixtures("facts_answer")

TESTS = Path(__file__).resolve().parent
ZYGOTE = f"""
import json, os, sys, traceback
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
import tqdm
tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread: one holding tqdm's lock at a fork left the child deadlocked
import agent.batch, agent.session, test_reliability_support
agent.session.default_embedder = test_reliability_support.ToyEmbedder
agent.batch.answered = lambda session, facts, *_: [True] * len(facts)  # FAKE, as the module's pytestmark says
from agent.cli import cli
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])  # import lazy modules
print(json.dumps({{"ready": os.getpid()}}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], req["flags"])
        print(json.dumps({{"status": status}}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        code = 1
        try:
            if req["stop"]:
                test_reliability_support.arm(req["stop"], req["layer_calls"])
            if req.get("poison"):
                test_reliability_support.poison(req["poison"])
            cli.main(req["args"], prog_name="kagent")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(json.dumps({{"pid": pid}}), flush=True)
"""


class Zygote:
    """A subprocess that forks kagent CLI runs on request."""

    def __init__(self, home: Path, model_dir: Path):
        env = os.environ | {"KAGENT_HOME": str(home), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(model_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=TESTS.parent)
        assert "ready" in self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "zygote died"
        return json.loads(line)

    def _send(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, args: list, logfile: Path, stop: str | None = None, layer_calls: int = 0,
              poison: str | None = None) -> int:
        """Fork `kagent ARGS`; with `stop`, the child stops itself at that phase (test_reliability_support.arm); with
        `poison`, it SIGKILLs itself inside compute whenever a batch holds that subject
        (test_reliability_support.poison)."""
        return self._send({"args": [str(a) for a in args], "log": str(logfile), "stop": stop,
                           "layer_calls": layer_calls, "poison": poison})["pid"]

    def wait(self, pid: int, stopped: bool = False) -> int:
        """Raw wait status of a child: when it ends, or (`stopped`) also when it stops itself."""
        return self._send({"wait": pid, "flags": os.WUNTRACED if stopped else 0})["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class Tally:
    runs: int = 0
    killed: int = 0  # runs that were SIGKILLed mid-way
    survived: int = 0  # kills after which every invariant held
    finished: int = 0  # runs that ended on their own before the kill
    by_command: Counter = field(default_factory=Counter)
    orphans: set = field(default_factory=set)  # distinct orphan tensor files seen (kill between file write and commit)
    phase_kills: Counter = field(default_factory=Counter)  # phase -> kills that landed at it
    phase_survived: Counter = field(default_factory=Counter)  # phase -> of those, kills after which all held
    stops: Counter = field(default_factory=Counter)  # where the children said they stopped ("optimise mid" ...)
    missed: int = 0  # runs that ended without reaching their phase (the guard rejected every fact), run again
    setup_runs: int = 0  # uninterrupted runs giving a rollback phase two committed batches to undo


def fact_line(i: int) -> str:
    return json.dumps({"subject": f"Town{i:03d}", "prompt": "{} is the capital of", "target": f"Land{i % 7}"})


def check_invariants(ws: Path, feed: Path, base: dict[int, torch.Tensor], model) -> set[str]:
    """Assert the crash invariants on a closed workspace; return the names of the orphan files."""
    ledger_root = ws / "ledger"
    with Ledger(ledger_root) as ledger:
        assert ledger.verify() == []
        offset = ledger.feed_offset(str(feed.resolve()))
        facts = ledger.facts()
        history = ledger.history()
        members = {b.id: [f.id for f in ledger.batch_facts(b.id)] for b in history}
        orphans = {p.name for p in ledger.orphan_files()}
        load_into(ledger, model)
    read, pos = [], 0
    for raw in feed.read_bytes().splitlines(keepends=True):
        pos += len(raw)
        if pos <= offset:
            read.append(json.loads(raw)["subject"])
    stored = Counter(f.record.subject for f in facts)
    assert stored == Counter(read), "a fact read from the feed was lost, stored twice, or stored unread"
    committed = {b.id for b in history if b.status == "committed"}
    in_committed = Counter(fid for b in committed for fid in members[b])
    assert all(n == 1 for n in in_committed.values()), "a fact is in two committed batches"
    for f in facts:
        assert f.status in ("pending", "applied", "failed", "quarantined", "rolled_back"), f
        if f.status in ("applied", "failed"):  # a failed fact sits in its batch (the model did not take it)
            assert in_committed[f.id] == 1 and f.batch_id in committed and f.id in members[f.batch_id], f
        else:
            assert in_committed[f.id] == 0, f"fact {f.id} is {f.status} but sits in a committed batch"
    assert max_rel_err(model, committed_weights(ledger_root, base)) < 1e-6
    return orphans


class Harness:
    """A workspace, its feed and the zygote; runs kagent to the end or kills it, checking the invariants."""

    def __init__(self, ws: Path, model_dir: Path, zygote: Zygote, tmp: Path):
        from transformers import AutoModelForCausalLM

        self.ws, self.zygote, self.tmp = ws, zygote, tmp
        self.base = base_layers(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.feed = tmp / "feed.jsonl"
        self.feed.write_text("")
        self.n_lines = 0
        self.n_runs = 0
        self.tally = Tally()

    def append(self, k: int) -> None:
        with self.feed.open("a") as fh:
            for _ in range(k):
                fh.write(fact_line(self.n_lines) + "\n")
                self.n_lines += 1

    def watch(self, batch_size: int | None = None) -> list:
        return ["watch", self.feed, "--once"] + (["--batch-size", str(batch_size)] if batch_size else [])

    def committed(self) -> list[int]:
        with Ledger(self.ws / "ledger") as ledger:
            return [b.id for b in ledger.history() if b.status == "committed"]

    def pending(self) -> int:
        with Ledger(self.ws / "ledger") as ledger:
            return len(ledger.facts(status="pending"))

    def start(self, cmd: list, **arm) -> tuple[int, Path]:
        self.n_runs += 1
        logfile = self.tmp / f"run{self.n_runs}.log"
        return self.zygote.start(cmd + ["--workspace", self.ws], logfile, **arm), logfile

    def check(self) -> None:
        self.tally.orphans |= check_invariants(self.ws, self.feed, self.base, self.model)

    def to_the_end(self, cmd: list) -> None:
        pid, logfile = self.start(cmd)
        status = self.zygote.wait(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, logfile.read_text()[-3000:]
        self.check()

    def finish(self) -> Tally:
        """A last uninterrupted run applies everything; then gc() removes the orphans and nothing changes."""
        self.to_the_end(self.watch())
        with Ledger(self.ws / "ledger") as ledger:
            assert len(ledger.facts()) == self.n_lines and not ledger.facts(status="pending")
            ledger.gc()
            assert ledger.orphan_files() == []
        self.check()
        return self.tally


def kill_loop(ws: Path, model_dir: Path, zygote: Zygote, tmp: Path, kills: int, seed: int) -> Tally:
    """SIGKILL runs at random times, uniform over 1.1 times the length of a whole run."""
    rng = random.Random(seed)
    h = Harness(ws, model_dir, zygote, tmp)
    tally, cycle = h.tally, 0
    # one uninterrupted run first: it commits batches (so rollback has work) and times a whole run, so the
    # kills below are spread over loading, intake, value optimisation, file writes and DB commits alike
    h.append(6)
    started = time.monotonic()
    h.to_the_end(h.watch(2))
    window = 1.1 * (time.monotonic() - started)
    while tally.killed < kills:
        cycle += 1
        h.append(rng.randint(2, 6))
        committed = h.committed()
        if cycle % 4 == 0 and committed:
            cmd = ["rollback", "--to", str(committed[max(0, len(committed) - 3)] - 1)]
        else:
            cmd = h.watch(rng.randint(1, 4))
        pid, logfile = h.start(cmd)
        time.sleep(rng.uniform(0.05, window))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = zygote.wait(pid)
        tally.runs += 1
        tally.by_command[cmd[0]] += 1
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            tally.killed += 1
            h.check()
            tally.survived += 1
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, logfile.read_text()[-3000:]
            tally.finished += 1
            h.check()
        log.info("cycle %d (%s): status %d", cycle, cmd[0], status)
    return h.finish()


def kill_at(h: Harness, phase: Phase, cmd: list, layer_calls: int) -> bool:
    """Run `cmd` armed at `phase` and SIGKILL it there; False if it ended without getting there."""
    pid, logfile = h.start(cmd, stop=phase.name, layer_calls=layer_calls)
    status = h.zygote.wait(pid, stopped=True)
    h.tally.runs += 1
    h.tally.by_command[cmd[0]] += 1
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, logfile.read_text()[-3000:]  # e.g. arm() found no such function
        h.tally.missed += 1
        h.check()
        return False
    assert os.WIFSTOPPED(status), status
    os.kill(pid, signal.SIGKILL)
    status = h.zygote.wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    where = logfile.read_text().rsplit(STOP_MARK, 1)[1].split("]")[0]
    assert where.split()[0] == phase.name, where
    h.tally.killed += 1
    h.tally.phase_kills[phase.name] += 1
    h.tally.stops[where] += 1
    h.check()
    h.tally.survived += 1
    h.tally.phase_survived[phase.name] += 1
    return True


def phase_loop(ws: Path, model_dir: Path, zygote: Zygote, tmp: Path, rounds: int, seed: int) -> Tally:
    """Each round kills one run at every phase of PHASES, in order: the child stops itself there (SIGSTOP) and
    is SIGKILLed while stopped; the crash invariants are checked after every kill."""
    rng = random.Random(seed)
    h = Harness(ws, model_dir, zygote, tmp)
    h.append(6)
    h.to_the_end(h.watch(2))
    for _ in range(rounds):
        for phase in PHASES:
            for attempt in range(3):
                if phase.command == "rollback":
                    if len(h.committed()) < 2:
                        h.append(4)
                        h.to_the_end(h.watch(2))
                        h.tally.setup_runs += 1
                    cmd = ["rollback", "--to", str(h.committed()[-2] - 1)]  # undo the last two batches
                else:
                    if phase.name.startswith("intake") or attempt or h.pending() < 2:
                        h.append(rng.randint(2, 4))
                    cmd = h.watch(1 if phase.name == "committed" else rng.randint(1, 3))  # committed: 2+ batches
                # "during" phases stop after this many transformer-layer calls (a 2-fact compute makes ~36)
                if kill_at(h, phase, cmd, rng.randint(1, 36) if phase.when == "during" else 0):
                    break
            else:
                pytest.fail(f"three runs ended without reaching phase {phase.name}")
    return h.finish()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def zygote(shared):
    z = Zygote(shared[2], shared[0])
    yield z
    z.close()


@pytest.fixture
def ws(shared, tmp_path):
    return Path(shutil.copytree(shared[1], tmp_path / "ws"))


def report(tally: Tally, request) -> None:
    # plain dicts and ints only: pytest-xdist ships user properties between processes and cannot send a Counter
    request.node.user_properties.append(("tally", {k: len(v) if isinstance(v, set) else dict(v) if isinstance(v, dict)
                                                   else v for k, v in vars(tally).items()}))
    log.warning("kills %d, survived %d, finished before the kill %d, runs %s, distinct orphan files %d",
                tally.killed, tally.survived, tally.finished, dict(tally.by_command), len(tally.orphans))
    if tally.phase_kills:
        log.warning("per phase %s; stops %s; runs that missed their phase %d, setup runs %d",
                    dict(tally.phase_kills), dict(tally.stops), tally.missed, tally.setup_runs)


def test_sigkill_at_random_points_loses_nothing_and_applies_nothing_twice(shared, zygote, ws, tmp_path, request):
    """Five random kills in the fast tier (every named phase is killed by the next test; fifty random ones: slow)."""
    tally = kill_loop(ws, shared[0], zygote, tmp_path, kills=5, seed=int(os.environ.get("KAGENT_CRASH_SEED", 0)))
    report(tally, request)
    assert tally.survived == tally.killed == 5


@pytest.mark.slow
def test_fifty_sigkills(shared, zygote, ws, tmp_path, request):
    tally = kill_loop(ws, shared[0], zygote, tmp_path, kills=50, seed=int(os.environ.get("KAGENT_CRASH_SEED", 1)))
    report(tally, request)
    assert tally.survived == tally.killed == 50


def test_sigkill_at_each_named_phase_loses_nothing_and_applies_nothing_twice(shared, zygote, ws, tmp_path, request):
    tally = phase_loop(ws, shared[0], zygote, tmp_path, rounds=1, seed=int(os.environ.get("KAGENT_CRASH_SEED", 0)))
    report(tally, request)
    assert tally.phase_survived == tally.phase_kills == Counter({p.name: 1 for p in PHASES})


@pytest.mark.slow
def test_five_sigkills_at_each_named_phase(shared, zygote, ws, tmp_path, request):
    tally = phase_loop(ws, shared[0], zygote, tmp_path, rounds=5, seed=int(os.environ.get("KAGENT_CRASH_SEED", 1)))
    report(tally, request)
    assert tally.phase_survived == tally.phase_kills == Counter({p.name: 5 for p in PHASES})


# ----------------------------------------------------------------------------- a fact that kills the editor


def poison_runs(h: Harness, subject: str, batch_size: int) -> list[Path]:
    """`kagent watch --once` with `subject` killing the process (SIGKILL inside compute) until a run finishes;
    returns the logs of the runs that were killed and, last, of the one that finished."""
    logs = []
    for _ in range(6):
        pid, logfile = h.start(h.watch(batch_size), poison=subject)
        status = h.zygote.wait(pid)
        logs.append(logfile)
        h.check()
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, logfile.read_text()[-3000:]
            return logs
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    pytest.fail("the breaker never stopped the crash loop")


def test_a_fact_that_kills_the_editor_three_times_is_quarantined_and_the_rest_applied(shared, zygote, ws, tmp_path):
    """The OOM-kill loop: one fact's batch is SIGKILLed from inside compute on every run. Two deaths in its batch
    isolate it (its batch-mates too), one death alone quarantines it; the fourth run finishes, nothing is lost."""
    h = Harness(ws, shared[0], zygote, tmp_path)
    h.append(6)
    logs = poison_runs(h, "Town002", batch_size=3)
    assert len(logs) == 4 and all(STOP_MARK + "poison Town002]" in log.read_text() for log in logs[:3])
    last = logs[-1].read_text()
    assert re.search(r"^quarantined fact \d+ \(Town002 is the capital of -> Land2\): stopped the editor 3 times",
                     last, re.M), last[-3000:]
    with Ledger(ws / "ledger") as ledger:
        facts = {f.record.subject: f for f in ledger.facts()}
        crashes = ledger.events("crash")
        assert ledger.verify() == []
    assert facts["Town002"].status == "quarantined" and facts["Town002"].reason.startswith("stopped the editor 3 ")
    assert len(crashes) == 3 and [len(e.data["facts"]) for e in crashes] == [3, 3, 1]
    others = [f for s, f in facts.items() if s != "Town002"]
    assert len(others) == 5 and all(f.status == "applied" or (f.status == "quarantined" and not
                                    f.reason.startswith("stopped the editor")) for f in others), others
    h.finish()  # one more plain run: nothing pending, nothing lost, no orphan after gc


# ----------------------------------------------------------------------------- corruption


@pytest.fixture
def edited(shared, ws, tmp_path):
    """The workspace after two committed batches, inside the toy-embedder patch."""
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(fact_line(i) + "\n" for i in range(4)))
    with one_thread(), _patched(shared[2]):
        res = run("watch", feed, "--once", "--batch-size", "2", "--workspace", ws)
        assert res.exit_code == 0 and "in 2 batch(es)" in res.output, res.output
        yield ws, feed


def delta_path(ws: Path, batch: int) -> Path:
    with Ledger(ws / "ledger") as ledger:
        return ws / "ledger" / "deltas" / f"{ledger.batch(batch).delta_hash}.safetensors"


def assert_load_refused(ws: Path, model_dir: Path, expect: str) -> None:
    from transformers import AutoModelForCausalLM

    with Ledger(ws / "ledger") as ledger:
        problems = ledger.verify()
        assert any(expect in p and "batch 1" in p for p in problems), problems
        with pytest.raises(LedgerMismatch):
            load_into(ledger, AutoModelForCausalLM.from_pretrained(model_dir))
    res = run("ask", "Town000 is the capital of", "--workspace", ws)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output


def test_altered_delta_is_reported_and_refuses_to_load(shared, edited):
    ws, _ = edited
    path = delta_path(ws, 1)
    delta = EditDelta.load(path)
    (delta.layers[0].u if delta.layers else delta.memory.deltas).mul_(1.001)  # weights or entity-memory slots
    delta.save(path)
    assert_load_refused(ws, shared[0], "tampered or corrupted")


def test_deleted_delta_is_reported_and_refuses_to_load(shared, edited):
    ws, _ = edited
    delta_path(ws, 1).unlink()
    assert_load_refused(ws, shared[0], "is missing")


def test_truncated_delta_is_reported_and_refuses_to_load(shared, edited):
    ws, _ = edited
    path = delta_path(ws, 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_load_refused(ws, shared[0], "unreadable")


# ----------------------------------------------------------------------------- disk full


def _real_write_failure(save, tensors, filename, metadata=None):
    """The real safetensors writer under a 64-byte file-size limit: the kernel refuses the write (EFBIG, the same
    path as ENOSPC), so this is exactly what safetensors raises when a write fails."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, old_limit[1]))
    try:
        save(tensors, filename, metadata)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _partial_then_enospc(save, tensors, filename, metadata=None):
    """100 bytes of the file reach the disk, then it is full (reported the way safetensors reports I/O errors)."""
    from safetensors import SafetensorError

    save(tensors, filename, metadata)
    Path(filename).write_bytes(Path(filename).read_bytes()[:100])
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


DISK_FULL = {  # where the write fails: (what of memory.blobs fails, on which kind of file)
    "safetensors-write": ("save_file", "deltas"),  # the real library, file-size limit
    "partial-write": ("save_file", "deltas"),  # a partial temp file is left, then ENOSPC
    "fsync": ("os.fsync", "deltas"),
    "rename": ("os.replace", "deltas"),
    "keys-file": ("save_file", "keys"),  # the delta file is already in place
    "database": ("sqlite", None),  # both files written, then SQLite finds no room for the commit transaction
}


def database_full(db: sqlite3.Connection) -> None:
    """A real SQLITE_FULL: with the page count capped at the database's size, write something needing new pages
    (into a table the test made). SQLite rolls back the open transaction itself, as on a full disk."""
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        db.execute("INSERT INTO fill VALUES (zeroblob(1 << 20))")
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")


def fail_writes(monkeypatch, where: str) -> list:
    """Make the batch's writes fail as DISK_FULL[where] says (one kind of tensor file, or the commit transaction);
    returns the list of failed calls (to check the failure was reached)."""
    import memory.blobs as blobs_mod

    target, kind = DISK_FULL[where]
    failed: list = []

    def in_kind(path) -> bool:
        return Path(path).parent.name == kind

    if target == "sqlite":
        real_attach = Ledger._attach_facts

        def attach_facts(self, *args):  # inside the commit transaction
            try:
                database_full(self.db)
            except sqlite3.OperationalError as exc:
                failed.append(exc)
                raise
            return real_attach(self, *args)

        monkeypatch.setattr(Ledger, "_attach_facts", attach_facts)
    elif target == "save_file":
        real_save = blobs_mod.save_file
        fail = _real_write_failure if where == "safetensors-write" else _partial_then_enospc

        def save_file(tensors, filename, metadata=None):
            if in_kind(filename):
                failed.append(filename)
                return fail(real_save, tensors, filename, metadata)
            return real_save(tensors, filename, metadata)

        monkeypatch.setattr(blobs_mod, "save_file", save_file)
    elif target == "os.fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if in_kind(os.readlink(f"/proc/self/fd/{fd}")):
                failed.append(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(blobs_mod.os, "fsync", fsync)
    else:
        real_replace = os.replace

        def replace(src, dst):
            if in_kind(dst):
                failed.append(dst)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
            return real_replace(src, dst)

        monkeypatch.setattr(blobs_mod.os, "replace", replace)
    return failed


@pytest.mark.parametrize("where", list(DISK_FULL))
def test_disk_full_while_writing_a_delta_aborts_the_batch_cleanly(shared, edited, monkeypatch, where):
    """A write error while the batch's tensor files are written: the batch is not committed, its facts stay
    pending (and are applied by the next run), nothing partial is left, the weights are base + committed deltas,
    and the CLI says so in one `Error:` line."""
    from transformers import AutoModelForCausalLM

    ws, feed = edited
    if where == "keys-file":  # entity-memory batches store no keys (their empty keys file exists already)
        w = Workspace.open(ws)
        w.save_config(w.config().model_copy(update={"editor": {"write": "weights"}}))
    with feed.open("a") as fh:
        fh.write(fact_line(4) + "\n" + fact_line(5) + "\n")
    with Ledger(ws / "ledger") as ledger:
        before = {f.id: (f.status, f.batch_id) for f in ledger.facts()}
        history = ledger.history()
        ledger.db.execute("CREATE TABLE fill (b BLOB)")  # for database_full
    failed = fail_writes(monkeypatch, where)
    with one_thread():
        res = run("watch", feed, "--once", "--batch-size", "2", "--workspace", ws)
    monkeypatch.undo()
    assert failed, "the write failure was never reached"
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), repr(res.exception)  # not a crash
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and res.output.rstrip("\n").endswith(errors[0]), res.output
    assert "not committed, they stay pending" in errors[0], errors[0]
    assert any(why in errors[0] for why in ("os error", "No space left", "database or disk is full")), errors[0]

    ledger_root = ws / "ledger"
    with Ledger(ledger_root) as ledger:
        assert ledger.verify() == []
        assert ledger.history() == history
        facts = ledger.facts()
        assert {f.id: (f.status, f.batch_id) for f in facts if f.id in before} == before
        new = [(f.record.subject, f.status) for f in facts if f.id not in before]
        assert new == [("Town004", "pending"), ("Town005", "pending")]
        assert ledger.feed_offset(str(feed.resolve())) == feed.stat().st_size
        assert not [p for p in ledger_root.rglob(".*") if p.is_file()], "a temp file was left behind"
        ledger.gc()  # complete files no batch refers to (keys-file: the delta; database: both)
        assert ledger.orphan_files() == []
        model = AutoModelForCausalLM.from_pretrained(shared[0])
        load_into(ledger, model)
    assert max_rel_err(model, committed_weights(ledger_root, base_layers(shared[0]))) < 1e-6

    with one_thread():  # the disk has room again: the same facts are applied, nothing was lost
        res = run("watch", feed, "--once", "--batch-size", "2", "--workspace", ws)
    assert res.exit_code == 0 and "2 applied in 1 batch(es)" in res.output, res.output
    with Ledger(ledger_root) as ledger:
        assert ledger.verify() == [] and not ledger.facts(status="pending")
        assert len(ledger.facts(status="applied")) == 6


def test_database_full_while_reading_the_feed_stores_nothing_and_resumes(edited, monkeypatch):
    """SQLite finds no room while a feed chunk is stored: one `Error:` line naming the cause, neither the facts
    nor the feed offset are stored, and the next run reads the same lines."""
    ws, feed = edited
    with feed.open("a") as fh:
        fh.write(fact_line(4) + "\n" + fact_line(5) + "\n")
    with Ledger(ws / "ledger") as ledger:
        offset, n_facts = ledger.feed_offset(str(feed.resolve())), len(ledger.facts())
        ledger.db.execute("CREATE TABLE fill (b BLOB)")
    real_add = Ledger.add_facts

    def add_facts(self, *args, **kwargs):  # inside the chunk's transaction
        database_full(self.db)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "add_facts", add_facts)
    res = run("watch", feed, "--once", "--workspace", ws)
    monkeypatch.undo()
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.output.splitlines() == ["Error: database or disk is full"], res.output
    with Ledger(ws / "ledger") as ledger:
        assert ledger.verify() == [] and len(ledger.facts()) == n_facts
        assert ledger.feed_offset(str(feed.resolve())) == offset
    res = run("watch", feed, "--once", "--batch-size", "2", "--workspace", ws)
    assert res.exit_code == 0 and "2 new fact(s)" in res.output and "2 applied" in res.output, res.output


def test_disk_full_leaves_the_running_session_consistent(edited, monkeypatch):
    """In the process that hit the error, the model and the editor's key sums are back to the ledger's, so the
    same facts commit once the disk has room again, without a restart."""
    import agent.session
    from agent.batch import run_batch
    from memory.record import parse_line

    ws, _ = edited
    session = agent.session.open_session(Workspace.open(ws))
    try:
        session.fact_index.add([parse_line(fact_line(i), i) for i in (4, 5)])
        facts = session.fact_index.pending()
        state = session.editor.state
        n_edits, kkt = state.n_edits, {layer: t.clone() for layer, t in state.kkt.items()}
        failed = fail_writes(monkeypatch, "rename")
        with pytest.raises(LedgerError, match="not committed"):
            run_batch(session, facts, {})
        monkeypatch.undo()
        assert failed
        check_model(session.ledger, session.model)
        assert state.n_edits == n_edits
        assert all(torch.allclose(state.kkt[layer], kkt[layer], rtol=1e-12, atol=1e-9) for layer in kkt)
        out = run_batch(session, facts, {})
        assert sorted(out.applied) == sorted(f.id for f in facts) and len(out.committed) == 1
    finally:
        session.close()


def test_deleted_faiss_index_is_rebuilt_and_still_deduplicates(edited, tmp_path):
    ws, feed = edited
    index = ws / "index" / "facts.faiss"
    assert index.exists()
    index.unlink()
    resent = tmp_path / "resent.jsonl"
    shutil.copy(feed, resent)
    res = run("watch", resent, "--once", "--workspace", ws)
    assert res.exit_code == 0 and "0 new fact(s), 4 duplicate(s)" in res.output, res.output
    assert index.exists()
    with Ledger(ws / "ledger") as ledger:
        assert len(ledger.facts()) == 4 and ledger.verify() == []


def test_older_schema_is_migrated_on_open(tmp_path):
    with Ledger(tmp_path / "l", MIGRATIONS[:1]) as old:
        assert old.applied_migrations() == [MIGRATIONS[0][0]]
    with Ledger(tmp_path / "l") as new:
        assert new.applied_migrations() == [n for n, _ in MIGRATIONS] and new.verify() == []
        assert new.feed_offset("x") == 0  # a table added by a later migration works


def test_workspace_made_by_another_model_is_refused(edited, tmp_path):
    from conftest import make_tiny_llama, toy_tokenizer

    ws, feed = edited
    other = tmp_path / "other-model"
    tok = toy_tokenizer()
    make_tiny_llama(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    w = Workspace.open(ws)
    w.save_config(w.config().model_copy(update={"model": str(other)}))
    res = run("watch", feed, "--once", "--workspace", ws)
    last = res.output.rstrip("\n").split("\n")[-1]  # earlier lines: stderr progress bars of the stats
    assert res.exit_code == 1 and last.startswith("Error: ") and "built on another model" in last, res.output
