"""The shared locate-then-edit core; methods differ only in stopping rule and solve.

compute(requests) -> EditResult, and the model at the end equals the model at the start:
layers are edited in order (each sees the earlier layers' updates, as MEMIT prescribes)
on a temporary in-place change that is restored from copies in a `finally`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from editors.arch import weight_view
from editors.delta import EditDelta, LayerDelta
from editors.keys import key_source
from editors.hparams import EditHParams
from editors.optimise import ValueResult, optimise_values
from editors.prompts import EditRequest, context_ids, key_rows
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


@torch.no_grad()
def generate_context_templates(model: nn.Module, tok, n: int, length: int, seed: int = 0) -> list[str]:
    """Short prefixes sampled once from the unedited model, as "{prefix}. {}" templates."""
    device = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[]):
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

    A subclass declares its method: `name`, `defaults` (hyperparameters over EditHParams' own, for any model
    family) and `families` (model_type -> the hyperparameters measured for that family, layers included);
    `editors.registry.METHODS.register(Subclass)` makes it a method.
    """

    name = "base"
    defaults: dict = {}
    families: dict[str, dict] = {}

    def __init__(self, model: nn.Module, tok, hparams: EditHParams, stats: dict[int, LayerStats],
                 state: EditorState | None = None):
        self.model, self.tok, self.hp, self.stats = model, tok, hparams, stats
        self.state = state or EditorState(list(hparams.layers))
        if not self.state.context_templates:
            self.state.context_templates = generate_context_templates(
                model, tok, hparams.n_context, hparams.context_tokens)
        self.pad = tok.pad_token_id or 0

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

    def compute(self, requests: list[EditRequest], progress: bool = False) -> EditResult:
        """Deltas and keys for `requests`; the model is unchanged afterwards."""
        t0 = time.perf_counter()
        bar = tqdm(total=len(requests), desc=f"{self.name} values", unit="edit", disable=not progress, leave=False)
        with bar:
            values = optimise_values(self.model, self.tok, requests, self.state.context_templates, self.hp, bar)
        result = self.solve_values(requests, values)
        result.seconds["values"] = time.perf_counter() - t0 - result.seconds["total"]
        result.seconds["total"] += result.seconds["values"]
        return result

    def solve_values(self, requests: list[EditRequest], values: ValueResult) -> EditResult:
        """The layer updates that move each request's output towards its target value (model unchanged)."""
        t0 = time.perf_counter()
        originals = {l: weight_view(self.model, l).clone() for l in self.hp.layers}
        deltas, keys, t_keys = [], {}, 0.0
        source = self._key_source(requests)
        try:
            for i, layer in enumerate(self.hp.layers):
                tk = time.perf_counter()
                K = self._layer_keys(source, layer, len(requests)).double()
                H = self._current_outputs(source, len(requests)).double()
                t_keys += time.perf_counter() - tk
                R = (values.z.T.double() - H) / (len(self.hp.layers) - i)
                V = self.solve(layer, K.cpu(), R.cpu())
                w = weight_view(self.model, layer)
                w.add_((R @ V.T.to(R.device)).to(w.dtype))
                deltas.append(LayerDelta(layer, R.float().cpu(), V.float().cpu()))
                keys[layer] = K.float().cpu()
        finally:
            with torch.no_grad():
                for layer, w0 in originals.items():
                    weight_view(self.model, layer).copy_(w0)
        total = time.perf_counter() - t0
        secs = {"keys": t_keys, "solve": total - t_keys, "total": total}
        return EditResult(EditDelta(deltas), keys, values.steps, secs, values.flops)

    def apply(self, result: EditResult) -> None:
        """Write the result into the model and add its keys to the editor state."""
        result.delta.apply(self.model)
        self.state.add_keys(result.keys)

    def revert(self, result: EditResult) -> None:
        result.delta.revert(self.model)
        self.state.add_keys(result.keys, sign=-1.0)

    def edit(self, requests: list[EditRequest], progress: bool = False) -> EditResult:
        result = self.compute(requests, progress)
        self.apply(result)
        return result

    def normal_matrix(self, layer: int, K: torch.Tensor) -> torch.Tensor:
        """lambda C0 + sum_p K_p K_p^T + K K^T (float64)."""
        c0 = self.stats[layer].mom2
        return self.hp.mom2_weight * c0 + self.state.prev_kkt(layer, c0.shape[0]) + K @ K.T


def cholesky_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A^-1 B for symmetric positive definite A, in float64."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError("normal matrix is not positive definite; raise mom2_weight or alpha")
    return torch.cholesky_solve(B, L)
