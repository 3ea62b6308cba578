"""Monitors measured around every batch: weight norms, flash and buildup, superposition, predicted interference.

All functions return flat `dict[str, float]` metric rows (names below) that the ledger stores with the batch:
    norm_ratio.L{l}   ||W_t|| / ||W_0||          norm_drift.L{l}  ||W_t - W_0|| / ||W_0||
    delta_ratio.L{l}  ||Delta|| / ||W||          delta_ratio      max over layers (the flash signal)
    flash             1.0 when delta_ratio is a robust outlier (median + k * MAD) over earlier batches
    buildup           least-squares slope of the mean norm drift per batch over the history (the trend)
    within_* prior_*  superposition statistics (evaluators.superposition)
    interference      max over layers of ||Delta K|| / ||W K|| on probe keys and earlier edits' keys
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta
from evaluators import norms
from evaluators.superposition import superposition

MAD_SCALE = 1.4826  # makes the MAD a consistent estimator of the standard deviation for Gaussian data
MIN_HISTORY = 3  # batches needed before a flash can be called


def base_weights(model: nn.Module, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited weights W_0 (call on the unedited model)."""
    return norms.snapshot(model, layers)


def lowrank_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """||U V^T||_F without forming the product."""
    u, v = u.double(), v.double()
    return float(torch.sqrt(((u.T @ u) * (v.T @ v)).sum().clamp_min(0)))


def norm_metrics(model: nn.Module, w0: dict[int, torch.Tensor], delta: EditDelta) -> dict[str, float]:
    """Norm growth of every edited layer after `delta` was applied, and the delta's relative size."""
    out: dict[str, float] = {}
    for n in norms.layer_norms(model, w0):
        out[f"norm_ratio.L{n.layer}"] = n.norm_ratio
        out[f"norm_drift.L{n.layer}"] = n.change_ratio
    for d in delta.layers:
        out[f"delta_ratio.L{d.layer}"] = lowrank_norm(d.u, d.v) / float(weight_view(model, d.layer).double().norm())
    out["delta_ratio"] = max((out[f"delta_ratio.L{d.layer}"] for d in delta.layers), default=0.0)
    return out


def is_flash(value: float, history: Sequence[float], k: float) -> bool:
    """True when `value` exceeds median + k * MAD of `history` (needs MIN_HISTORY earlier values)."""
    if len(history) < MIN_HISTORY:
        return False
    h = np.asarray(history, dtype=float)
    med = float(np.median(h))
    mad = MAD_SCALE * float(np.median(np.abs(h - med)))
    return value > med + k * max(mad, 1e-3 * abs(med), 1e-12)


def buildup(drifts: Sequence[float]) -> float:
    """Slope of a least-squares line through the mean norm drift per batch (0 with fewer than 2 points)."""
    if len(drifts) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(drifts), dtype=float), np.asarray(drifts, dtype=float), 1)[0])


def mean_drift(metrics: dict[str, float]) -> float:
    vals = [v for k, v in metrics.items() if k.startswith("norm_drift.")]
    return float(np.mean(vals)) if vals else 0.0


def trend_metrics(current: dict[str, float], history: Sequence[dict[str, float]], k: float) -> dict[str, float]:
    """Flash and buildup of the current batch against earlier batches' metric rows."""
    past = [h["delta_ratio"] for h in history if "delta_ratio" in h]
    drifts = [mean_drift(h) for h in history] + [mean_drift(current)]
    return {"flash": float(is_flash(current.get("delta_ratio", 0.0), past, k)), "buildup": buildup(drifts)}


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


def superposition_metrics(keys: dict[int, torch.Tensor], prior: dict[int, torch.Tensor],
                          c0: dict[int, torch.Tensor], whiteners: Callable[[int], torch.Tensor] | None = None
                          ) -> dict[str, float]:
    """Superposition statistics at the last edited layer that has a covariance (where target values live);
    `whiteners(layer)` gives C0^-1/2 when it is cached (agent.session), else it is computed here."""
    layers = [l for l in sorted(keys) if l in c0]
    if not layers:
        return {}
    layer = layers[-1]
    return superposition(keys[layer], prior.get(layer), c0[layer], whiteners(layer) if whiteners else None)
