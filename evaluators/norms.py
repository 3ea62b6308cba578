"""Weight-norm growth of the edited modules: how far sequential edits have moved each layer.

Take `snapshot(model, layers)` before editing; afterwards `layer_norms` gives, per layer,
||W_t||_F / ||W_0||_F and ||W_t - W_0||_F / ||W_0||_F, and `norm_growth` the largest ratio.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel
from torch import nn

from editors.arch import weight_view


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
