"""ENCORE (Gupta et al., 2025): MEMIT + Most-Probable Early Stopping + a Frobenius-norm term.

The stopping rule ("mpes") lives in the hyperparameters; the solve adds alpha*I to MEMIT's
normal matrix, which bounds ||Delta||_F and with it the weight-norm growth of long edit runs.
"""
from __future__ import annotations

import torch

from editors.core import Editor, cholesky_solve
from editors.hparams import SMOLLM2


class Encore(Editor):
    name = "encore"
    defaults = {"alpha": 10.0, "stop": "mpes"}
    families = {"llama": {**SMOLLM2, "lr": 2.0}}  # lr 2.0 halves MPES steps on SmolLM2 (BENCHMARKS.md)

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        A = self.normal_matrix(layer, K)
        A.diagonal().add_(self.hp.alpha)
        return cholesky_solve(A, K)
