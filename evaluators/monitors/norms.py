"""Weight-norm growth of the edited modules: how far sequential edits have moved each layer, and a delta's size.

Take `snapshot(model, layers)` (or `base_weights`) before editing; afterwards `layer_norms` gives, per layer,
||W_t||_F / ||W_0||_F and ||W_t - W_0||_F / ||W_0||_F, and `norm_growth` the largest ratio. `norm_metrics` is the
batch's metric row: those ratios per layer (`norm_ratio.L{l}`, `norm_drift.L{l}`) and the delta's norm against the
weight's (`delta_ratio.L{l}`, and `delta_ratio` their max: the flash signal, evaluators/monitors/trend.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta


class LayerNorm(BaseModel):
    layer: int  # decoder layer index of the edited module
    norm_ratio: float  # ||W_t||_F / ||W_0||_F (1.0 = no growth)
    change_ratio: float  # ||W_t - W_0||_F / ||W_0||_F (0.0 = unchanged)


def snapshot(model: nn.Module, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited weights (out, in) of `layers`, to compare against later (on the CPU)."""
    return {layer: weight_view(model, layer).detach().to("cpu", copy=True) for layer in layers}


def _layer_norm(layer: int, current: torch.Tensor, base: torch.Tensor) -> LayerNorm:
    w_t, w_0 = current.detach().double().cpu(), base.double()
    ref = float(torch.linalg.norm(w_0))
    return LayerNorm(layer=layer, norm_ratio=float(torch.linalg.norm(w_t)) / ref,
                     change_ratio=float(torch.linalg.norm(w_t - w_0)) / ref)


def layer_norms(model: nn.Module, base: Mapping[int, torch.Tensor]) -> list[LayerNorm]:
    """Per edited layer, the norm and change ratios of the current weight against its base copy."""
    return [_layer_norm(layer, weight_view(model, layer), w0) for layer, w0 in sorted(base.items())]


def norm_growth(model: nn.Module, base: Mapping[int, torch.Tensor]) -> float:
    """max over the edited layers of ||W_t|| / ||W_0|| (1.0 for an unedited model)."""
    return max((n.norm_ratio for n in layer_norms(model, base)), default=1.0)


def base_weights(model: nn.Module, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited weights W_0 (call on the unedited model)."""
    return snapshot(model, layers)


def lowrank_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """||U V^T||_F without forming the product."""
    u, v = u.double(), v.double()
    return float(torch.sqrt(((u.T @ u) * (v.T @ v)).sum().clamp_min(0)))


def norm_metrics(model: nn.Module, w0: dict[int, torch.Tensor], delta: EditDelta) -> dict[str, float]:
    """Norm growth of every edited layer after `delta` was applied, and the delta's relative size."""
    out: dict[str, float] = {}
    for n in layer_norms(model, w0):
        out[f"norm_ratio.L{n.layer}"] = n.norm_ratio
        out[f"norm_drift.L{n.layer}"] = n.change_ratio
    for d in delta.layers:
        out[f"delta_ratio.L{d.layer}"] = lowrank_norm(d.u, d.v) / float(weight_view(model, d.layer).double().norm())
    out["delta_ratio"] = max((out[f"delta_ratio.L{d.layer}"] for d in delta.layers), default=0.0)
    return out
