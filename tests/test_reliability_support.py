"""Shared helpers of the reliability suites (no tests here): a tiny-model workspace built once per test run
and cached on disk, single-threaded torch (the CI machine has two shared cores), ledger invariant checks, and the
named phases where the crash harness stops a forked kagent run to kill it.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner

import agent.session
from agent.cli import cli
from agent.workspace import Workspace
from conftest import ToyEmbedder, one_thread  # noqa: F401  (one_thread is re-exported to the suites)
from editors.arch import weight_view
from editors.delta import EditDelta
from memory.ledger import Ledger

log = logging.getLogger(__name__)

LAYERS = [1, 2]


def run(*args):
    """`kagent ARGS` in-process (the toy embedder must be patched in by the caller)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def build_workspace(base: Path, home: Path) -> tuple[Path, Path]:
    """(model_dir, workspace) under `base`, made once and reused (marker file `done`)."""
    from conftest import make_tiny_llama, pretrain, toy_tokenizer

    model_dir, root = base / "tiny-llama", base / "ws"
    if (base / "done").exists():
        return model_dir, root
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    tok = toy_tokenizer()
    pretrain(make_tiny_llama(len(tok)), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with _patched(home):
        res = run("init", "--model", model_dir, "--layers", ",".join(map(str, LAYERS)), "--stats-tokens", "4000",
                  "--workspace", root)
    assert res.exit_code == 0, res.output
    ws = Workspace.open(root)
    ws.save_config(ws.config().model_copy(update={"probe_tokens": 256, "probe_facts": 8, "retention_sample": 8}))
    with _patched(home):  # take the baseline with these probe settings once, not in every kagent run
        session = agent.session.open_session(ws)
        try:
            session.baseline()
        finally:
            session.close()
    (base / "done").write_text("ok")
    return model_dir, root


@contextmanager
def _patched(home: Path):
    old_embedder, old_home = agent.session.default_embedder, os.environ.get("KAGENT_HOME")
    agent.session.default_embedder = ToyEmbedder
    os.environ["KAGENT_HOME"] = str(home)
    try:
        yield
    finally:
        agent.session.default_embedder = old_embedder
        if old_home is None:
            os.environ.pop("KAGENT_HOME", None)
        else:
            os.environ["KAGENT_HOME"] = old_home


def shared_workspace(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model_dir, pristine workspace, KAGENT_HOME) shared by every reliability module of this run."""
    base = tmp_path_factory.getbasetemp() / "reliability-shared"
    home = base.parent / "reliability-home"
    with one_thread():
        model_dir, root = build_workspace(base, home)
    return model_dir, root, home


def base_layers(model_dir: Path) -> dict[int, torch.Tensor]:
    """The tracked layers of the pristine base model, read from its checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {layer: weight_view(model, layer).detach().clone() for layer in LAYERS}


def committed_weights(ledger_root: Path, base: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """`base` plus every committed batch's delta file, added in commit order (float64): computed here,
    independently of Ledger._build."""
    with Ledger(ledger_root) as ledger:
        committed = [b for b in ledger.history() if b.status == "committed"]
    out = {layer: w.double().clone() for layer, w in base.items()}
    for b in committed:
        for d in EditDelta.load(ledger_root / "deltas" / f"{b.delta_hash}.safetensors").layers:
            out[d.layer] += d.u.double() @ d.v.double().T
    return out


def max_rel_err(model, expected: dict[int, torch.Tensor]) -> float:
    errs = []
    for layer, w in expected.items():
        got = weight_view(model, layer).detach().double()
        errs.append(float((got - w).norm() / w.norm()))
    return max(errs, default=0.0)


# ----------------------------------------------------------------------------- phases of a run, for targeted kills


@dataclass(frozen=True)
class Phase:
    """A named point of a `kagent watch` / `kagent rollback` run. The crash harness arms it in a forked child
    (`arm`): kagent's own function is wrapped from the test side (no hook in kagent), the child stops itself
    (SIGSTOP) when it gets there, and the harness SIGKILLs it."""

    name: str
    module: str  # module holding the function
    attr: str  # the function, or Class.method
    when: str  # "before" the call | "after" it returns | "commit": before the COMMIT of the first outermost
    #            ledger transaction opened inside the call | "committed": right after that COMMIT | "during": after
    #            `layer_calls` transformer-layer forwards inside the call (or at its return, if it makes fewer)
    command: str  # the CLI command that reaches it: watch | rollback
    what: str  # what is on disk when the run dies there
    kind: str | None = None  # only for writes of this kind of tensor file (deltas | keys)


PHASES = [
    Phase("intake-tx", "agent.intake", "store_chunk", "commit", "watch",
          "a feed chunk's facts, events and byte offset written, COMMIT not issued"),
    Phase("intake-done", "agent.intake", "store_chunk", "after", "watch",
          "a feed chunk committed as pending facts, no batch formed yet"),
    Phase("optimise", "agent.batch", "compute", "during", "watch",
          "inside Editor.compute (keys, value optimisation, solve), nothing written"),
    Phase("delta-temp", "memory.blobs", "save_file", "after", "watch",
          "the delta's temp file written, not fsynced or renamed", kind="deltas"),
    Phase("delta-file", "memory.blobs", "BlobStore.write", "after", "watch",
          "delta file renamed into place, keys file not written", kind="deltas"),
    Phase("files-written", "memory.ledger", "Ledger._record_batch", "before", "watch",
          "delta and keys files in place, commit transaction not begun"),
    Phase("commit-tx", "memory.ledger", "Ledger._record_batch", "commit", "watch",
          "batch, edits, fact statuses, fingerprints and event written, COMMIT not issued"),
    Phase("committed", "memory.ledger", "Ledger.commit", "committed", "watch",
          "a batch's transaction committed, the run's next batch not started"),
    Phase("rollback-tx", "memory.ledger", "Ledger._record_rollback", "commit", "rollback",
          "batch and fact statuses and fingerprints of a rollback written, COMMIT not issued"),
    Phase("between-rollbacks", "memory.ledger", "Ledger.undo", "committed", "rollback",
          "rollback --to over two batches: the first one's transaction committed, its event and the second not"),
]
PHASE_BY_NAME = {p.name: p for p in PHASES}


STOP_MARK = "[kill point reached: "


def _stop(label: str) -> None:
    """Note where (on the child's stderr, which the harness keeps) and stop until the harness kills us."""
    os.write(2, f"{STOP_MARK}{label}]\n".encode())
    os.kill(os.getpid(), signal.SIGSTOP)


def arm(name: str, layer_calls: int = 0) -> None:
    """In a forked kagent child: stop (SIGSTOP) at the first time phase `name` is reached."""
    from memory.ledger import Ledger

    phase = PHASE_BY_NAME[name]
    owner = importlib.import_module(phase.module)
    owner_name, _, attr = phase.attr.rpartition(".")
    if owner_name:
        owner = getattr(owner, owner_name)
    real = getattr(owner, attr)
    state = {"inside": 0, "done": False, "layers": 0}

    def matches(args) -> bool:
        if phase.kind is None:
            return True
        return any(a == phase.kind or (isinstance(a, str) and Path(a).parent.name == phase.kind) for a in args)

    def hit(label: str = name) -> None:
        if not state["done"]:
            state["done"] = True
            _stop(label)

    def wrapper(*args, **kwargs):
        if state["done"] or not matches(args):
            return real(*args, **kwargs)
        if phase.when == "before":
            hit()
        state["inside"] += 1
        try:
            out = real(*args, **kwargs)
        finally:
            state["inside"] -= 1
        if phase.when in ("after", "during"):
            hit(name if phase.when == "after" else f"{name} end")
        return out

    setattr(owner, attr, wrapper)
    if phase.when in ("commit", "committed"):
        real_tx = Ledger.transaction

        @contextmanager
        def transaction(self):
            with real_tx(self) as db:
                yield db
                if state["inside"] and self._depth == 1 and phase.when == "commit":
                    hit()
            if state["inside"] and self._depth == 0 and phase.when == "committed":
                hit()

        Ledger.transaction = transaction
    if phase.when == "during":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        real_forward = LlamaDecoderLayer.forward

        def forward(*args, **kwargs):
            if state["inside"]:
                state["layers"] += 1
                if state["layers"] == layer_calls:
                    hit(f"{name} mid")
            return real_forward(*args, **kwargs)

        LlamaDecoderLayer.forward = forward


def poison(subject: str) -> None:
    """In a forked kagent child: SIGKILL the process from inside `agent.batch.compute` whenever the batch holds a
    fact about `subject`, as the kernel's OOM killer would (a fact that takes the editor down every time)."""
    import agent.batch

    real = agent.batch.compute

    def compute(session, group, *rest):  # rest: the retries' `also` (agent.batch.compute)
        if any(f.record.subject == subject for f in group):
            os.write(2, f"{STOP_MARK}poison {subject}]\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(session, group, *rest)

    agent.batch.compute = compute
