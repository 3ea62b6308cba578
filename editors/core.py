"""The shared locate-then-edit core; methods differ only in stopping rule and solve.

compute(requests) -> EditResult, and the model at the end equals the model at the start. Target values
are optimised at the last edited layer (with the entity memory suspended); then `hparams.write` decides
where they go:
- "weights": layers are edited in order (each sees the earlier layers' updates, as MEMIT prescribes)
  on a temporary in-place change that is restored from copies in a `finally`; the result is a low-rank
  weight delta per layer;
- "memory": each subject's residual becomes a slot of the entity memory (editors.entity_memory), one
  value shared by all requests about that subject (`companions` are earlier requests about the same
  subjects that the slot must keep answering).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from editors.arch import weight_view
from editors.delta import EditDelta, LayerDelta
from editors.devices import cuda_devices, input_device, layer_device, synchronize
from editors.entity_memory import EntityMemory, MemoryWrite, stack_keys, keys_and_radii, last_states, recall_tokens
from editors.keys import key_source
from editors.movers import anchored, principal_complement
from editors.hparams import EditHParams
from editors.optimise import ValueResult, optimise_values
from editors.prompts import EditRequest, answer_texts, context_ids, in_context, key_rows
from editors.state import EditorState
from editors.stats import LayerStats

log = logging.getLogger(__name__)

CONTEXT_SEEDS = ["The", "Therefore", "Because", "I", "You"]


@dataclass
class EditResult:
    delta: EditDelta  # per-layer low-rank update U V^T
    keys: dict[int, torch.Tensor]  # layer -> (d_in, n) keys; their K K^T is the batch's share of the state
    steps: list[int]  # value-optimisation checks per edit
    seconds: dict[str, float] = field(default_factory=dict)  # keys / values / solve wall time
    flops: float = 0.0  # matmul FLOPs of the value optimisation
    z: torch.Tensor | None = None  # (n, d) target values of the requests (what a re-solve from base needs)


@torch.no_grad()
def generate_context_templates(model: nn.Module, tok, n: int, length: int, seed: int = 0) -> list[str]:
    """Short prefixes sampled once from the unedited model, as "{prefix}. {}" templates."""
    device = input_device(model)
    out = []
    with torch.random.fork_rng(devices=cuda_devices(model)):  # CPU and every CUDA device in use
        torch.manual_seed(seed)
        for s in CONTEXT_SEEDS[:n]:
            ids = tok(s, return_tensors="pt").to(device)
            gen = model.generate(**ids, max_new_tokens=length, do_sample=True, top_k=5,
                                 pad_token_id=tok.pad_token_id or 0)
            text = tok.decode(gen[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(text.strip().replace("\n", " ") + ". {}")
    return out


class Editor:
    """Locate-then-edit on `hparams.layers`; subclasses set the stopping rule and `solve`.

    A subclass declares its method: `name` and `defaults` (hyperparameters over EditHParams' own, for any model;
    what differs per model is the table in editors/defaults.py); `editors.registry.METHODS.register(Subclass)`
    makes it a method.
    """

    name = "base"
    defaults: dict = {}

    def __init__(self, model: nn.Module, tok, hparams: EditHParams, stats: dict[int, LayerStats],
                 state: EditorState | None = None):
        self.model, self.tok, self.hp = model, tok, hparams
        devices = {layer: layer_device(model, layer) for layer in hparams.layers}
        self.stats = {layer: st.to(devices.get(layer, st.mom2.device)) for layer, st in stats.items()}
        self.state = state or EditorState(list(hparams.layers))
        self.state.place(devices)  # key sums and projections live beside their layer's weight
        if not self.state.context_templates:
            self.state.context_templates = generate_context_templates(
                model, tok, hparams.n_context, hparams.context_tokens)
        self.pad = tok.pad_token_id or 0
        self.memory = EntityMemory(tok, hparams.value_layer)  # slots written by write="memory" results
        self.slot_requests: dict[str, list[EditRequest]] = {}  # subject -> requests its slot answers (edit())
        self.value_cache: dict = {}  # "stamp" -> (weights, hparams); group key -> ValueResult (see values_for)
        self.base: dict[int, torch.Tensor] | None = None  # unedited weights of the edited layers (values_on="base")
        self._protect: dict[int, torch.Tensor] = {}  # layer -> SPHERE projector of its base weight (protect_energy)

    # --- the two places methods differ -------------------------------------------------
    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """V (d_in, n) such that the layer's update is R V^T; K, R in float64."""
        raise NotImplementedError

    # --- shared core ---------------------------------------------------------------------
    def keys_by_layer(self, requests: list[EditRequest]) -> dict[int, torch.Tensor]:
        """Keys of every edited layer for the current model, read in one pass up the stack."""
        source = self._key_source(requests)
        return {layer: self._layer_keys(source, layer, len(requests)) for layer in self.hp.layers}

    def _key_source(self, requests: list[EditRequest]):
        templates = self.state.context_templates
        return key_source(self.model, key_rows(self.tok, requests, templates), self.pad,
                          context_ids(self.tok, templates))

    def _layer_keys(self, source, layer: int, n: int) -> torch.Tensor:
        """(d_in, n): 0.5 k(prompt) + 0.5 mean over the context prefixes, at the subject's last token."""
        k = source.keys(layer).view(n, 1 + len(self.state.context_templates), -1)
        return (0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)).T

    def _current_outputs(self, source, n: int) -> torch.Tensor:
        """(d, n): the last edited layer's output at the subject's last token of the plain prompt."""
        plain = torch.arange(n) * (1 + len(self.state.context_templates))
        return source.outputs(self.hp.layers[-1], plain).T

    def compute(self, requests: list[EditRequest], progress: bool = False,
                companions: list[EditRequest] | None = None) -> EditResult:
        """Deltas (or memory slots) and keys for `requests`; the model is unchanged afterwards."""
        t0 = time.perf_counter()
        memory = self.hp.write == "memory"
        every = requests + (list(companions or []) if memory else [])
        groups = subject_groups(every) if memory else list(range(len(every)))
        with self.memory.suspended(), self._value_site():
            values = self.values_for(every, groups, progress)
            if self.hp.nas_factor and not memory:
                values = self._anchor(every, values)
        result = self.memory_result(every, values) if memory else self.solve_values(requests, values)
        result.steps, result.z = values.steps[: len(requests)], values.z[: len(requests)].detach().float().cpu()
        result.seconds["values"] = time.perf_counter() - t0 - result.seconds["total"]
        result.seconds["total"] += result.seconds["values"]
        return result

    def values_for(self, requests: list[EditRequest], groups: list[int], progress: bool = False) -> ValueResult:
        """Target values of `requests` (equal `groups` share a delta), reusing values this editor already
        optimised for the same group on the same weights with the same settings (a bisected batch's halves)."""
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        stamp = self.value_stamp()
        if self.value_cache.get("stamp") != stamp:
            self.value_cache.clear()  # in place: a bench may share this dict between editors (values_on="base")
            self.value_cache["stamp"] = stamp
        keys = {g: tuple(requests[i].key for i in m) for g, m in members.items()}
        todo = [g for g in members if keys[g] not in self.value_cache]
        idx = [i for g in todo for i in members[g]]
        flops = 0.0
        if idx:
            bar = tqdm(total=len(idx), desc=f"{self.name} values", unit="edit", disable=not progress, leave=False)
            with bar:
                fresh = optimise_values(self.model, self.tok, [requests[i] for i in idx],
                                        self.state.context_templates, self.hp, bar, [groups[i] for i in idx])
            flops, at = fresh.flops, 0
            for g in todo:
                n = len(members[g])
                self.value_cache[keys[g]] = ValueResult(fresh.z[at:at + n], fresh.steps[at:at + n], 0.0,
                                                        fresh.delta[at:at + n], fresh.states)
                at += n
        parts = {g: self.value_cache[keys[g]] for g in members}
        first = next(iter(parts.values()))
        z, delta = first.z.new_empty(len(requests), first.z.shape[1]), first.z.new_empty(len(requests), first.z.shape[1])
        steps = [0] * len(requests)
        for g, m in members.items():
            z[m], delta[m] = parts[g].z, parts[g].delta
            for i, s in zip(m, parts[g].steps):
                steps[i] = s
        states = {}
        for shared in {id(p.states): p.states for p in parts.values()}.values():  # chunks share one dict
            states |= shared
        return ValueResult(z, steps, flops, delta, states)

    def value_stamp(self) -> tuple:
        """What target values depend on: the weights (always the base ones with values_on="base") and the settings
        of the value optimisation, not those of the solve (so variants of the solve can share values)."""
        settings = self.hp.model_dump_json(include={"lr", "max_steps", "clamp_factor", "kl_factor", "keep_factor",
                                                    "memory_site", "answer_margin", "answer_discriminant",
                                                    "weight_decay", "stop", "nll_stop", "mpes_patience", "n_context",
                                                    "context_tokens", "value_chunk"})
        weights = ("base",) if self.hp.values_on == "base" else self.weights_stamp()
        return weights, settings, self.hp.value_layer, tuple(self.state.context_templates)

    def _value_site(self):
        """Where target values are optimised: the current weights, or the base ones (NSE's rewinding)."""
        if self.hp.values_on == "current":
            return nullcontext()
        if self.base is None:
            raise ValueError("values_on = base needs the editor's base weights (Editor.base)")
        return self._at_base(self.base)

    @torch.no_grad()
    def _anchor(self, requests: list[EditRequest], values: ValueResult) -> ValueResult:
        """NAS (editors.movers): values rescaled to the pilot edits' mean ||v*||, outliers left unedited."""
        layer = self.hp.layers[-1]
        source = self._key_source(requests)
        plain = torch.arange(len(requests)) * (1 + len(self.state.context_templates))
        w = weight_view(self.model, layer)
        v0 = (source.keys(layer)[plain.to(w.device)].to(w.dtype) @ w.T).float()
        z, delta = values.z.detach().float().to(v0.device), values.delta.detach().float().to(v0.device)
        h0 = z - delta
        if not self.state.value_anchor:
            self.state.value_anchor = float((v0 + delta).norm(dim=1).mean())
        z, skip = anchored(z, h0, v0, self.state.value_anchor, self.hp.nas_factor)
        if skip.any():
            log.info("NAS: %d of %d value(s) above %.1fx the anchor norm left unedited", int(skip.sum()),
                     len(requests), self.hp.nas_factor)
        return ValueResult(z.to(values.z.dtype), values.steps, values.flops, (z - h0).to(values.z.dtype))

    def protection(self, layer: int) -> torch.Tensor:
        """SPHERE's projector for `layer`, from its base weight (the current one when no base is set)."""
        if layer not in self._protect:
            w = self.base[layer] if self.base is not None else weight_view(self.model, layer)
            self._protect[layer] = principal_complement(w, self.hp.protect_energy)
        return self._protect[layer]

    @torch.no_grad()
    def weights_stamp(self) -> tuple[float, ...]:
        """A cheap summary of the edited layers' weights (target values depend on them)."""
        return tuple(float(x) for layer in self.hp.layers
                     for w in [weight_view(self.model, layer)] for x in (w.sum(), w.norm()))

    @contextmanager
    def solving_with(self, solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """`solve(layer, K, R)` in place of this method's closed form for the block (e.g. AlphaEdit's null-space
        solve in a compaction); the target values, their stopping rule and cache stay this method's."""
        self.solve = solve
        try:
            yield
        finally:
            del self.solve

    @contextmanager
    def overriding(self, **changes) -> Iterator[EditHParams]:
        """Other hyperparameters (e.g. a stronger value optimisation for a retry) for the block."""
        before = self.hp
        self.hp = before.model_copy(update=changes)
        try:
            yield self.hp
        finally:
            self.hp = before

    def memory_result(self, requests: list[EditRequest], values: ValueResult) -> EditResult:
        """One entity-memory slot per subject of `requests` (requests about one subject share their value)."""
        first = {r.subject: i for i, r in reversed(list(enumerate(requests)))}
        subjects = list(first)
        deltas = values.delta[[first[s] for s in subjects]].detach().float().cpu()
        aliases: dict[str, list[str]] = {}
        for r in requests:
            aliases[r.subject] = list(dict.fromkeys([*aliases.get(r.subject, []), *r.aliases]))
        read = values.states if self.hp.values_on == "current" else {}  # base-weight values: states of other weights
        keys = self.answer_keys(requests, subjects, read) if self.hp.memory_site == "answer" else (None, None)
        answers = self.recalled(requests) if self.hp.memory_site == "answer" and self.hp.answer_recall else {}
        write = MemoryWrite(self.hp.value_layer, subjects, deltas, {s: a for s, a in aliases.items() if a}, *keys,
                            answers)
        return EditResult(EditDelta([], write), {}, values.steps, {"total": 0.0}, values.flops)

    def recalled(self, requests: list[EditRequest]) -> dict[str, list[int]]:
        """Per subject, the tokens the model without the memory answers its requests' prompts with (those that name
        something): its answer-site slot also fires where the model would give one of them."""
        with self.memory.suspended():
            tokens = recall_tokens(self.model, self.tok, [r.prompt.replace("{}", r.subject, 1) for r in requests])
        out: dict[str, list[int]] = {}
        for r, t in zip(requests, tokens):
            if t is not None and t not in out.setdefault(r.subject, []):
                out[r.subject].append(t)
        return {s: t for s, t in out.items() if t}

    def answer_keys(self, requests: list[EditRequest], subjects: list[str], known: dict[str, torch.Tensor] | None = None):
        """Per subject, the key and radius of its answer-site slot: its requests' prompts and forms must fire it,
        its keep prompts and description must not (states read on the model without the memory; `known`: states
        already read, text -> the memory layer's output at its last token, e.g. the value rows')."""
        texts: dict[str, tuple[list[str], list[str]]] = {s: ([], [f"{s} is a", f"{s} is"]) for s in subjects}
        contexts = ["{}", *self.state.context_templates]
        for r in requests:
            pos, neg = texts[r.subject]
            pos += answer_texts(r, self.state.context_templates)
            pos += [in_context(c, t).replace("{}", s, 1) for t, s in r.cues for c in contexts]
            neg += [t.replace("{}", r.subject, 1) for t in r.keep]
        for pos, neg in texts.values():  # a prompt the edit asks is no other statement (e.g. the edit "X is a ...")
            asked = set(pos)
            neg[:] = [t for t in dict.fromkeys(neg) if t not in asked]
        flat = [t for s in subjects for part in texts[s] for t in part]
        known = known or {}
        todo = list(dict.fromkeys(t for t in flat if t not in known))
        with self.memory.suspended():
            read = dict(zip(todo, last_states(self.model, self.tok, todo, self.hp.value_layer)))
        states = torch.stack([read[t] if t in read else known[t] for t in flat])
        states = torch.nn.functional.normalize(states, dim=1)
        keys, at = {}, 0
        for s in subjects:
            n_pos, n_neg = len(texts[s][0]), len(texts[s][1])
            keys[s] = keys_and_radii(states[at: at + n_pos], states[at + n_pos: at + n_pos + n_neg],
                                     self.hp.answer_margin, self.hp.answer_discriminant)
            at += n_pos + n_neg
        return stack_keys(subjects, keys)

    def solve_values(self, requests: list[EditRequest], values: ValueResult) -> EditResult:
        """The layer updates that move each request's output towards its target value (model unchanged)."""
        t0 = time.perf_counter()
        originals = {l: weight_view(self.model, l).clone() for l in self.hp.layers}
        deltas, keys, t_keys = [], {}, 0.0
        source = self._key_source(requests)
        try:
            for i, layer in enumerate(self.hp.layers):
                tk = time.perf_counter()
                dev = layer_device(self.model, layer)  # keys, residuals and the solve stay on the layer's device
                K = self._layer_keys(source, layer, len(requests)).to(dev, torch.float64)
                H = self._current_outputs(source, len(requests)).to(dev, torch.float64)
                synchronize(self.model)
                t_keys += time.perf_counter() - tk
                R = (values.z.T.to(dev, torch.float64) - H) / (len(self.hp.layers) - i)
                V = self.solve(layer, K, R)
                if self.hp.protect_energy:
                    V = self.protection(layer).to(V.device) @ V
                w = weight_view(self.model, layer)
                w.add_((R @ V.T).to(w.dtype))
                deltas.append(LayerDelta(layer, R.float().cpu(), V.float().cpu()))
                keys[layer] = K.float().cpu()
        finally:
            with torch.no_grad():
                for layer, w0 in originals.items():
                    weight_view(self.model, layer).copy_(w0)
        synchronize(self.model)
        total = time.perf_counter() - t0
        secs = {"keys": t_keys, "solve": total - t_keys, "total": total}
        return EditResult(EditDelta(deltas), keys, values.steps, secs, values.flops)

    @contextmanager
    def _at_base(self, base: dict[int, torch.Tensor]) -> Iterator[None]:
        """The edited layers set to `base`, the entity memory suspended and no earlier keys carried, for the block;
        weights and key sums as they were afterwards."""
        current = {layer: weight_view(self.model, layer).clone() for layer in self.hp.layers}
        saved = self.state.kkt
        self.state.kkt = {}
        try:
            with torch.no_grad():
                for layer, w in base.items():
                    weight_view(self.model, layer).copy_(w)
            with self.memory.suspended():
                yield
        finally:
            self.state.kkt = saved
            with torch.no_grad():
                for layer, w in current.items():
                    weight_view(self.model, layer).copy_(w)

    def consolidate(self, requests: list[EditRequest], z: torch.Tensor, base: dict[int, torch.Tensor]) -> EditResult:
        """All `requests` solved jointly from the base weights `base` towards their values `z` (D4S-style):
        keys and residuals are read on the base model and no earlier keys are carried. The result is a delta
        relative to `base`; the model and the editor state are unchanged afterwards."""
        with self._at_base(base), torch.no_grad():
            return self.solve_values(requests, ValueResult(z, [0] * len(requests), 0.0))

    def rebase(self, requests: list[EditRequest], base: dict[int, torch.Tensor], progress: bool = False) -> EditResult:
        """All `requests` edited jointly from the base weights `base`: target values optimised on the base model
        (NSE's "rewinding") and one solve without earlier keys (D4S). A delta relative to `base`; the model, the
        memory and the editor state are unchanged afterwards."""
        with self._at_base(base):
            return self.compute(requests, progress)

    def apply(self, result: EditResult) -> None:
        """Write the result into the model (and memory) and add its keys to the editor state."""
        result.delta.apply(self.model)
        if result.delta.memory is not None:
            self.memory.write(result.delta.memory)
        self.state.add_keys(result.keys)

    def revert(self, result: EditResult) -> None:
        """Undo `apply` for weights and keys (memory slots are rebuilt by their owner, e.g. the ledger)."""
        result.delta.revert(self.model)
        self.state.add_keys(result.keys, sign=-1.0)

    def edit(self, requests: list[EditRequest], progress: bool = False) -> EditResult:
        """compute + apply; in memory mode earlier requests about the same subjects are kept as companions
        (a later request with the same subject and prompt replaces the earlier one)."""
        new = {(r.subject, r.prompt) for r in requests}
        companions = [c for r in dict.fromkeys(r.subject for r in requests)
                      for c in self.slot_requests.get(r, []) if (c.subject, c.prompt) not in new]
        result = self.compute(requests, progress, companions)
        self.apply(result)
        for subject in dict.fromkeys(r.subject for r in requests):
            self.slot_requests[subject] = [c for c in companions if c.subject == subject] + \
                [r for r in requests if r.subject == subject]
        return result

    def normal_matrix(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """lambda C0 + sum_p K_p K_p^T + K K^T (float64)."""
        c0 = self.stats[layer].mom2
        return self.hp.mom2_weight * c0 + self.state.prev_kkt(layer, c0.shape[0]) + K @ K.T


def subject_groups(requests: list[EditRequest]) -> list[int]:
    """Group index per request: requests about the same subject share one."""
    index: dict[str, int] = {}
    return [index.setdefault(r.subject, len(index)) for r in requests]


def cholesky_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A^-1 B for symmetric positive definite A, in float64."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError("normal matrix is not positive definite; raise mom2_weight or alpha")
    return torch.cholesky_solve(B, L)
