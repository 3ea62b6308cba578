"""AlphaEdit (Fang et al., 2025): updates projected onto the null space of the preserved keys.

P spans the eigenvectors of C0 with eigenvalues below a threshold;
Delta = R K^T P (P (sum_p K_p K_p^T + K K^T) + l2 I)^-1 (not symmetric: an LU solve).
"""
from __future__ import annotations

import torch

from editors.core import Editor
from editors.stats import LayerStats


class AlphaEdit(Editor):
    name = "alphaedit"

    def projection(self, layer: int) -> torch.Tensor:
        """The null-space projector of C0, computed once with the statistics (on their device) for a threshold."""
        if layer not in self.state.projections:
            self.state.projections[layer] = stats_projection(self.stats[layer], self.hp.nullspace_threshold)
        return self.state.projections[layer]

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return nullspace_solve(self.projection(layer), K, self.hp.alphaedit_l2, self.state.prev_kkt(layer, K.shape[0]))


def stats_projection(stats: LayerStats, threshold: float) -> torch.Tensor:
    """The null-space projector of a layer's C0 for `threshold`, computed once per statistics object."""
    return stats.cached(("nullspace", threshold), lambda c0: nullspace_projection(c0, threshold))


def nullspace_solve(P: torch.Tensor, K: torch.Tensor, l2: float, prior_kkt: torch.Tensor | None = None) -> torch.Tensor:
    """V (d_in, n) of AlphaEdit's update R V^T: (P (prior_kkt + K K^T) + l2 I)^-1 P K, float64 in and out (no
    `prior_kkt`: no earlier keys)."""
    kkt = K @ K.T if prior_kkt is None else prior_kkt + K @ K.T
    A = P.to(K) @ kkt
    A.diagonal().add_(l2)
    return torch.linalg.solve(A, P.to(K) @ K)


def nullspace_projection(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U U^T over the eigenvectors U of C0 whose eigenvalues are below `threshold`."""
    evals, evecs = torch.linalg.eigh(c0)
    small = evecs[:, evals < threshold]
    return small @ small.T
