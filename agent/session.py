"""An open workspace with its model, editor and ledger, ready to edit: what `watch`, `rollback` and `ask` use.

Loading order matters: the editor's covariance statistics and context templates come from the *unedited* model,
so the editor is built before base + committed deltas are written into the model (`memory.model_sync.attach`). The
editor state's key sums are then rebuilt from the committed batches' stored keys, so state and weights always
agree with the ledger.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agent.config import AgentConfig, ConfigError
from agent.limits import LimitChecker, checker_for
from agent.workspace import Baseline, Workspace
from editors.arch import n_layers
from editors.core import Editor
from editors.entity_memory import EntityMemory, MemoryWrite
from editors.models import LoadedModel, dtype_name, fingerprint, load_model
from editors.registry import make_editor
from editors.state import EditorState
from editors.user_corpus import UserCorpus
from evaluators.edit_forms import EditForms
from evaluators.monitors.memory_tier import HeldOut
from evaluators.monitors.norms import base_weights
from evaluators.monitors.superposition import whitener
from evaluators.probes.suite import ProbeSuite
from evaluators.relations import RelationBank
from memory.index import Embedder, FactIndex, MiniLMEmbedder
from memory.ledger import Ledger
from memory.model_sync import attach, restore

log = logging.getLogger(__name__)


@dataclass
class Session:
    ws: Workspace
    cfg: AgentConfig
    loaded: LoadedModel
    ledger: Ledger
    editor: Editor
    fact_index: FactIndex  # the FAISS index over the ledger's facts (dedup, supersede, planning vectors)
    probes: ProbeSuite
    w0: dict[int, torch.Tensor]  # base weights of the edited layers
    prior_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> keys of committed edits (d, m)
    _probe_keys: dict[int, torch.Tensor] | None = None  # layer -> keys of the known-fact probes, computed once
    hooks: ExitStack = field(default_factory=ExitStack)  # the entity memory's hooks while the session is open
    limits: LimitChecker | None = None  # feed-line limits in the model's tokens (agent/limits.py)
    held_out: HeldOut | None = None  # held-out lines and residual norm for the memory tier's monitors (memory_tier.py)
    forms: EditForms | None = None  # turns facts into edit requests with their forms and keep prompts

    @property
    def model(self):
        return self.loaded.model

    @property
    def tok(self):
        return self.loaded.tok

    def request(self, fact):
        """The edit request of a stored fact: its prompt, forms and keep prompts (evaluators/edit_forms.py)."""
        return self.forms.request(fact.record) if self.forms is not None else fact.record.to_request()

    @property
    def layers(self) -> list[int]:
        return list(self.editor.hp.layers)

    def probe_settings(self) -> str:
        """What the probes measure; a baseline taken with other settings is not comparable."""
        c = self.cfg
        return f"facts={c.probe_facts} tokens={c.probe_tokens} file={c.probe_file}"

    def baseline(self) -> Baseline:
        """The workspace baseline, re-measured on a fresh base model when the probe settings changed since."""
        baseline = self.ws.baseline()
        if baseline is None or baseline.probes != self.probe_settings():
            log.warning("probe settings changed since the baseline (or none was taken); measuring it again "
                        "on the unedited model")
            base = load_model(self.cfg.model, **self.cfg.load_options())
            baseline = measure_baseline(self.ws, self.probes, base, self.probe_settings())
        return baseline

    def close(self) -> None:
        self.hooks.close()
        self.ledger.close()

    def restore(self) -> None:
        """Model weights and entity memory back to exactly what the ledger's committed batches hold."""
        restore(self.ledger, self.model)
        self.sync_memory()

    def sync_memory(self) -> None:
        """The editor's entity memory = the committed batches' slots (after open, reject and rollback)."""
        self.editor.memory.load(self.ledger.memory_write())

    def add_prior_keys(self, keys: dict[int, torch.Tensor]) -> None:
        for layer, k in keys.items():
            old = self.prior_keys.get(layer)
            k = k.detach().float().cpu()
            self.prior_keys[layer] = k if old is None else torch.cat([old, k], dim=1)

    def covariances(self) -> dict[int, torch.Tensor]:
        return {layer: st.mom2 for layer, st in self.editor.stats.items()}

    def whitener(self, layer: int) -> torch.Tensor:
        """C0^-1/2 of `layer`, computed once with the statistics (not every batch)."""
        return self.editor.stats[layer].cached("whitener", whitener)

    def probe_keys(self) -> dict[int, torch.Tensor]:
        """Keys of the known-fact probes at every edited layer (what a batch must not move); computed once per
        workspace (at `kagent init`, on the unedited model) and cached under the workspace's cache dir."""
        if self._probe_keys is None:
            reqs = self.probes.key_requests()
            digest = hashlib.sha256(json.dumps([self.layers, self.editor.state.context_templates,
                                                [(r.prompt, r.subject) for r in reqs]]).encode()).hexdigest()[:16]
            path = self.ws.cache_dir / f"probe-keys-{digest}.safetensors"
            if path.exists():
                self._probe_keys = {int(k): v for k, v in load_file(str(path)).items()}
            else:
                self._probe_keys = {l: k.float().cpu() for l, k in self.editor.keys_by_layer(reqs).items()} if reqs else {}
                self.ws.cache_dir.mkdir(parents=True, exist_ok=True)
                save_file({str(k): v.contiguous() for k, v in self._probe_keys.items()}, str(path))
        return self._probe_keys

    def history_metrics(self) -> list[dict[str, float]]:
        """"after" metrics of the committed batches, oldest first."""
        return [self.ledger.metrics(b.id).get("after", {}) for b in self.ledger.history() if b.status == "committed"]

    def rebuild_state(self) -> None:
        """Editor key sums and prior keys = exactly the committed batches' keys."""
        self.editor.state.kkt.clear()
        self.editor.state.n_edits = 0
        self.prior_keys = {}
        for info in self.ledger.history():
            if info.status == "committed":
                keys = self.ledger.load_keys(info.id)
                self.editor.state.add_keys(keys)
                self.add_prior_keys(keys)


def build_editor(ws: Workspace, cfg: AgentConfig, loaded: LoadedModel) -> Editor:
    """The configured editor on the unedited model, reusing the workspace's saved context templates."""
    depth = n_layers(loaded.model)
    if any(not 0 <= layer < depth for layer in cfg.layers):
        raise ConfigError(f"{ws.config_path}: layers = {cfg.layers}: the model has {depth} layers (0-{depth - 1})")
    state = EditorState.load(ws.state_path) if ws.state_path.exists() else None
    corpus = UserCorpus(Path(cfg.stats_corpus)) if cfg.stats_corpus else None
    editor = make_editor(cfg.method, loaded.model, loaded.tok, state=state, hparams_file=cfg.hparams_file or None,
                         corpus=corpus, **cfg.hparam_overrides())
    if not 0 <= editor.hp.value_layer < depth:
        raise ConfigError(f"{ws.config_path}: memory_layer = {editor.hp.value_layer}: the model has {depth} layers "
                          f"(0-{depth - 1})")
    if state is None:
        editor.state.save(ws.state_path)
    return editor


def keep_memory_layer(editor: Editor, stored: MemoryWrite | None) -> None:
    """A workspace whose slots were written at another layer (an older default) keeps that layer."""
    if stored is None or stored.layer == editor.memory.layer:
        return
    log.info("entity memory stays at layer %d, where this workspace's slots were written (configured: %d)",
             stored.layer, editor.memory.layer)
    editor.hp = editor.hp.model_copy(update={"memory_layer": stored.layer})
    editor.memory = EntityMemory(editor.tok, stored.layer)


def default_embedder() -> Embedder:
    """The fact index's embedder (tests replace this function to use a toy one)."""
    return MiniLMEmbedder()


def open_ledger(ws: Workspace) -> Ledger:
    return Ledger(ws.ledger_dir)


def open_fact_index(ws: Workspace, ledger: Ledger) -> FactIndex:
    return FactIndex(ledger, default_embedder(), index_path=ws.index_dir / "facts.faiss")


def open_session(ws: Workspace, loaded: LoadedModel | None = None) -> Session:
    """Load the model, build the editor on its base weights, then bring it to base + committed deltas."""
    cfg = ws.config()
    loaded = loaded or load_model(cfg.model, **cfg.load_options())
    editor = build_editor(ws, cfg, loaded)
    w0 = base_weights(loaded.model, editor.hp.layers)
    editor.base = w0  # values_on = "base" and SPHERE's projector read the unedited weights
    ledger = open_ledger(ws)
    attach(ledger, loaded.model, editor.hp.layers)
    probes = ProbeSuite.shipped(cfg.probe_facts, cfg.probe_tokens, cfg.probe_file, cfg.damage_file, cfg.damage_facts)
    session = Session(ws, cfg, loaded, ledger, editor, open_fact_index(ws, ledger), probes, w0,
                      limits=checker_for(cfg, loaded.tok, loaded.model.config),
                      forms=EditForms(RelationBank.load(), loaded.tok))
    try:
        stored = ledger.memory_write()  # read once: it decides the memory's layer, then fills it (= sync_memory())
        keep_memory_layer(editor, stored)
        session.hooks.enter_context(editor.memory.attached(loaded.model))
        editor.memory.load(stored)
        session.rebuild_state()
    except BaseException:
        session.close()
        raise
    log.info("workspace %s: %s with %d committed edit(s)", ws.root, cfg.model, session.editor.state.n_edits)
    return session


def measure_baseline(ws: Workspace, probes: ProbeSuite, base: LoadedModel, settings: str) -> Baseline:
    """Probe the unedited model `base` and store the values as the workspace baseline."""
    values = probes.downstream(base.model, base.tok)
    return ws.save_baseline(values.get("known_acc"), values["perplexity"], fingerprint(base.model), settings)


def create_workspace(root: Path, cfg: AgentConfig, loaded: LoadedModel) -> tuple[Workspace, Baseline]:
    """A new workspace at `root` editing `loaded` (the dtype it loaded in written to the config), its probe baselines
    measured (`kagent init`); nothing is left at `root` when this fails."""
    cfg = cfg.model_copy(update={"dtype": dtype_name(next(loaded.model.parameters()).dtype)})  # auto, resolved
    ws = Workspace.create(root, cfg)
    try:
        with ws.writer():
            session = open_session(ws, loaded)
            baseline = initialise(session)
            session.close()
    except BaseException:
        shutil.rmtree(ws.root, ignore_errors=True)
        raise
    return ws, baseline


def initialise(session: Session) -> Baseline:
    """At `kagent init` (the model is unedited): the baseline and the probe keys."""
    session.probe_keys()
    return measure_baseline(session.ws, session.probes, session.loaded, session.probe_settings())
