"""AlphaEdit (Fang et al., 2025): updates projected onto the null space of the preserved keys.

P spans the eigenvectors of C0 with eigenvalues below a threshold;
Delta = R K^T P (P (sum_p K_p K_p^T + K K^T) + l2 I)^-1 (not symmetric: an LU solve).
"""
from __future__ import annotations

import torch

from editors.core import Editor
from editors.hparams import SMOLLM2


class AlphaEdit(Editor):
    name = "alphaedit"
    families = {"llama": SMOLLM2}

    def projection(self, layer: int) -> torch.Tensor:
        if layer not in self.state.projections:
            evals, evecs = torch.linalg.eigh(self.stats[layer].mom2)
            small = evecs[:, evals < self.hp.nullspace_threshold]
            self.state.projections[layer] = small @ small.T
        return self.state.projections[layer]

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        P = self.projection(layer)
        A = P @ (self.state.prev_kkt(layer, K.shape[0]) + K @ K.T)
        A.diagonal().add_(self.hp.alphaedit_l2)
        return torch.linalg.solve(A, P @ K)
