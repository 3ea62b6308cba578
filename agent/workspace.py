"""The workspace: one directory holding the config, ledger, fact index, caches and probe baselines.

Layout (all under the workspace root):
    config.toml     AgentConfig (see agent.config)
    ledger/         the edit ledger (memory.Ledger: ledger.db and its tensor files)
    editor_state.safetensors  context templates of the editor (its key sums are rebuilt from the ledger)
    index/          the fact index (memory/index.py: FAISS snapshot + vector log)
    cache/          per-workspace caches (probe keys, ...)
    baseline.json   probe baselines measured on the unedited model at `kagent init`
    .lock           held by the one process allowed to write
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

from agent.config import AgentConfig, load_config, save_config
from editors.models import kagent_home

log = logging.getLogger(__name__)


class WorkspaceError(RuntimeError):
    """A user-facing workspace problem (missing, already there, busy)."""


class Baseline(BaseModel):
    """Probe values of the unedited model; thresholds in the config are relative to these."""

    known_acc: float | None = Field(description="known-fact accuracy of the unedited model (0-1); None without probes")
    perplexity: float = Field(description="perplexity of the unedited model on the held-out probe text")
    model_fingerprint: str = Field(description="editors.models.fingerprint of the unedited model")
    measured_at: str = Field(description="ISO-8601 time of measurement")
    probes: str = Field("", description="probe settings the values were measured with")


def default_root() -> Path:
    """`$KAGENT_HOME/workspace`, or the user data dir's `workspace`; read at call time."""
    return kagent_home() / "workspace"


@dataclass
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def ledger_dir(self) -> Path:
        return self.root / "ledger"

    @property
    def state_path(self) -> Path:
        return self.root / "editor_state.safetensors"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def baseline_path(self) -> Path:
        return self.root / "baseline.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def exists(self) -> bool:
        return self.config_path.exists()

    @classmethod
    def create(cls, root: Path, config: AgentConfig) -> "Workspace":
        """Make the directories and write the config; refuses an existing workspace."""
        ws = cls(Path(root).expanduser().resolve())
        if ws.exists():
            raise WorkspaceError(f"a workspace already exists at {ws.root}")
        for path in (ws.root, ws.index_dir, ws.cache_dir):
            path.mkdir(parents=True, exist_ok=True)
        save_config(config, ws.config_path)
        return ws

    @classmethod
    def open(cls, root: Path | None = None) -> "Workspace":
        ws = cls(Path(root or default_root()).expanduser().resolve())
        if not ws.exists():
            raise WorkspaceError(f"no workspace at {ws.root}; run `kagent init` first")
        return ws

    def config(self) -> AgentConfig:
        return load_config(self.config_path)

    def save_config(self, config: AgentConfig) -> None:
        save_config(config, self.config_path)

    def baseline(self) -> Baseline | None:
        if not self.baseline_path.exists():
            return None
        return Baseline.model_validate_json(self.baseline_path.read_text())

    def save_baseline(self, known_acc: float | None, perplexity: float, model_fingerprint: str,
                      probes: str) -> Baseline:
        baseline = Baseline(known_acc=known_acc, perplexity=perplexity, model_fingerprint=model_fingerprint,
                            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), probes=probes)
        tmp = self.baseline_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(baseline.model_dump(), indent=2) + "\n")
        tmp.replace(self.baseline_path)
        return baseline

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the workspace's write lock; a second writer gets WorkspaceError at once."""
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise WorkspaceError(
                f"workspace {self.root} is in use by another kagent process ({self._holder()}); "
                "wait for it to finish") from None
        try:
            (self.root / ".lock.pid").write_text(str(os.getpid()))
            yield
        finally:
            lock.release()

    def writer_holder(self) -> str | None:
        """Who holds the write lock right now (None when nobody does); does not block."""
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return self._holder()
        lock.release()
        return None

    def _holder(self) -> str:
        try:
            return "pid " + (self.root / ".lock.pid").read_text().strip()
        except OSError:
            return "lock " + str(self.lock_path)
