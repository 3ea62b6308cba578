"""Monitors: flash detection, buildup, superposition statistics, predicted interference and norm growth."""
from __future__ import annotations

import torch

from editors.arch import weight_view
from editors.delta import EditDelta, LayerDelta
from evaluators.monitors.interference import predicted_interference
from evaluators.monitors.norms import base_weights, lowrank_norm, norm_metrics
from evaluators.monitors.superposition import overlap_stats, superposition, whitener
from evaluators.monitors.trend import buildup, is_flash, trend_metrics


def test_flash_is_a_robust_outlier_over_history():
    history = [0.010, 0.011, 0.009, 0.012, 0.010, 0.5]  # one earlier outlier must not mask the next
    assert not is_flash(0.012, history, k=6)
    assert is_flash(0.2, history, k=6)
    assert not is_flash(10.0, [0.01, 0.01], k=6)  # too little history to call it


def test_buildup_is_the_trend_of_drift():
    assert buildup([0.0, 0.1, 0.2, 0.3]) > 0.09
    assert abs(buildup([0.2, 0.2, 0.2])) < 1e-12
    row = trend_metrics({"delta_ratio": 1.0, "norm_drift.L1": 0.4},
                        [{"delta_ratio": 0.01, "norm_drift.L1": 0.1}] * 4, k=6)
    assert row["flash"] == 1.0 and row["buildup"] > 0


def test_whitened_overlaps_see_through_the_covariance():
    torch.manual_seed(0)
    d = 64
    scales = torch.ones(d)
    scales[0] = 100.0  # a dominant direction that all raw keys share
    c0 = torch.diag(scales**2)
    keys = torch.randn(d, 20) * scales[:, None]
    raw = overlap_stats(torch.nn.functional.normalize(keys, dim=0).T @ torch.nn.functional.normalize(keys, dim=0))
    white = superposition(keys, None, c0)
    assert raw.max > 0.9  # raw cosines are dominated by the shared direction
    assert white["within_max"] < 0.7 and abs(white["within_mean"]) < 0.1
    dup = superposition(keys[:, :3], keys[:, :3], c0)
    assert abs(dup["prior_max"] - 1.0) < 1e-9  # the same fact again overlaps fully with its earlier edit
    w = whitener(c0)
    assert torch.allclose(w @ c0.double() @ w, torch.eye(d, dtype=torch.float64), atol=1e-8)


def test_norms_and_interference_of_a_lowrank_delta(tiny_llama):
    layer = 1
    w0 = base_weights(tiny_llama, [layer])
    w = weight_view(tiny_llama, layer)
    u, v = torch.randn(w.shape[0], 2), torch.randn(w.shape[1], 2)
    delta = EditDelta([LayerDelta(layer, u, v)])
    assert abs(lowrank_norm(u, v) - float((u @ v.T).norm())) < 1e-4
    keys = {layer: torch.randn(w.shape[1], 5)}
    expected = float(((u @ v.T) @ keys[layer]).norm() / (w @ keys[layer]).norm())
    assert abs(predicted_interference(tiny_llama, delta, keys) - expected) < 1e-5
    delta.apply(tiny_llama)
    m = norm_metrics(tiny_llama, w0, delta)
    assert abs(m[f"norm_drift.L{layer}"] - float((u @ v.T).norm() / w0[layer].norm())) < 1e-5
    assert m["delta_ratio"] == m[f"delta_ratio.L{layer}"] > 0
