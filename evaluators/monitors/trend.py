"""Flash and buildup: a batch's norm metrics against the batches before it.

`flash` is 1.0 when the batch's `delta_ratio` exceeds median + k * MAD of earlier batches' (a robust outlier: one
batch that moved the weights far more than usual); `buildup` is the least-squares slope of the mean norm drift per
batch over the history (a slow, steady growth no single batch shows).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAD_SCALE = 1.4826  # makes the MAD a consistent estimator of the standard deviation for Gaussian data
MIN_HISTORY = 3  # batches needed before a flash can be called


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
