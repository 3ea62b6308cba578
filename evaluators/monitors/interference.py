"""Predicted interference: how far a delta moves the edited layers' outputs on reference keys, before it is applied.

max over layers of ||Delta K|| / ||W K|| for reference keys K (the probe facts' keys and earlier edits' keys): a
delta that moves what those keys read out by a large share of their output will change the facts behind them.
"""
from __future__ import annotations

import torch
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta


@torch.no_grad()
def predicted_interference(model: nn.Module, delta: EditDelta, keys: dict[int, torch.Tensor]) -> float:
    """max over layers of ||Delta K|| / ||W K|| for reference keys K (d_in, m) per layer, before applying Delta."""
    worst = 0.0
    for d in delta.layers:
        k = keys.get(d.layer)
        if k is None or k.numel() == 0:
            continue
        w = weight_view(model, d.layer).double()
        k = k.double().to(w.device)
        moved = d.u.double().to(w.device) @ (d.v.double().to(w.device).T @ k)
        worst = max(worst, float(moved.norm() / (w @ k).norm().clamp_min(1e-30)))
    return worst
