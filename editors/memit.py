"""MEMIT (Meng et al., 2023): NLL-threshold stopping; Delta = R K^T (lambda C0 + sum_p K_p K_p^T + K K^T)^-1."""
from __future__ import annotations

import torch

from editors.core import Editor, cholesky_solve


class Memit(Editor):
    name = "memit"

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return cholesky_solve(self.normal_matrix(layer, K), K)
