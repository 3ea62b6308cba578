"""Frontier movers of the weight write (issue 15): how big a solved value may be, and which directions an update avoids.

- NAS ("Norm Anchors Make Model Edits Last", Liu et al., 2026): each solved value v* = v0 + delta (the MLP output an
  edit asks for at the last edited layer, v0 the current one) is rescaled to the mean ||v*|| of the pilot edits on
  the base model, which breaks the feedback between growing values and growing weights; a v* above `nas_factor`
  times that mean is not edited at all (its target stays the output it has).
- SPHERE ("Energy-Regularized Sequential Model Editing on Hyperspheres", Liu et al., 2025): the update is projected
  off the principal directions of the pretrained weight's neurons (rows normalised to the unit sphere), so the
  directions that carry most of the weight's energy are not perturbed.
Both are options of the shared core (EditHParams.nas_factor, EditHParams.protect_energy), off by default.
"""
from __future__ import annotations

import torch


def anchored(z: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, anchor: float,
             factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (n, d) whose v* = v0 + (z - h0) has norm `anchor`, and the mask of rows left unedited (z = h0)
    because their ||v*|| exceeded `factor` * `anchor`."""
    v = v0 + (z - h0)
    norms = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    skip = norms[:, 0] > factor * anchor
    out = h0 + (v * (anchor / norms) - v0)
    out[skip] = h0[skip]
    return out, skip


def principal_complement(w: torch.Tensor, energy: float) -> torch.Tensor:
    """P = I - U U^T (d_in, d_in, float64): U spans the right singular vectors of `w` (out, in) with its rows
    normalised, the leading ones that hold `energy` of the squared singular values."""
    if not 0.0 < energy < 1.0:
        raise ValueError(f"protect_energy must lie in (0, 1), got {energy}")
    rows = w.double() / w.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    share = (s ** 2).cumsum(0) / (s ** 2).sum()
    k = int((share < energy).sum()) + 1
    u = vh[:k].T
    return torch.eye(w.shape[1], dtype=torch.float64, device=w.device) - u @ u.T
