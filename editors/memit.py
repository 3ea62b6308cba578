"""MEMIT (Meng et al., 2023): NLL-threshold stopping; Delta = R K^T (lambda C0 + sum_p K_p K_p^T + K K^T)^-1."""
from __future__ import annotations

import torch

from editors.core import Editor, cholesky_solve
from editors.hparams import SMOLLM2


class Memit(Editor):
    name = "memit"
    families = {"llama": SMOLLM2}

    def solve(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return cholesky_solve(self.normal_matrix(layer, K), K)
