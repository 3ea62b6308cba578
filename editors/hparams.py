"""Typed editing hyperparameters and the per-family defaults chosen by measurement.

Defaults for a (method, model_type) pair come from DEFAULTS; `hparams_for` fills in a
depth-scaled layer choice for families nobody has tuned yet. The SmolLM2 sweep that
chose the llama values is recorded in BENCHMARKS.md.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EditHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int]  # edited MLP output layers, ascending; target values live at the last one
    mom2_weight: float = 15000.0  # lambda: weight of the preserved-key covariance C0 in the normal matrix
    alpha: float = 0.0  # Frobenius-norm term alpha*I in the normal matrix (ENCORE); 0 for MEMIT
    lr: float = 0.5  # Adam learning rate of the target-value delta
    max_steps: int = 25  # most optimisation steps per target value
    clamp_factor: float = 0.75  # ||delta|| <= clamp_factor * ||h0||
    kl_factor: float = 0.0625  # weight of KL(new || old) on "{subject} is a"
    weight_decay: float = 0.5  # weight of ||delta||^2 / ||h0||^2
    stop: str = Field("nll", pattern="^(nll|mpes)$")  # stopping rule: NLL threshold (MEMIT) or MPES (ENCORE)
    nll_stop: float = 0.05  # "nll" rule: stop an edit once its mean target NLL falls below this
    mpes_patience: int = 1  # "mpes" rule: consecutive checks with every target token most probable
    n_context: int = 5  # context prefixes generated once by the unedited model
    context_tokens: int = 10  # length of each generated prefix
    stats_tokens: int = 100_000  # corpus tokens for the covariance statistics
    nullspace_threshold: float = 1e-2  # AlphaEdit: eigenvalues of C0 below this span the null space
    alphaedit_l2: float = 10.0  # AlphaEdit: ridge term of its normal matrix
    value_chunk: int = 16  # edits optimised in one padded batch (32: same speed, +1.2 GB peak RSS; BENCHMARKS.md)


_ENCORE = {"stop": "mpes"}
# llama values measured on SmolLM2-135M (BENCHMARKS.md, "sweep"): lambda 15000 realised only a third
# of the target residual (ES .56 on 16 edits); 3000 realised 69 % (ES 1.0). lr 2.0 halves MPES steps.
_SMOL = {"layers": [3, 4, 5, 6, 7], "mom2_weight": 3000.0}
DEFAULTS: dict[str, dict[str, dict]] = {
    "memit": {"llama": dict(_SMOL)},
    "encore": {"llama": {**_SMOL, "alpha": 10.0, "lr": 2.0, **_ENCORE}},
    "alphaedit": {"llama": dict(_SMOL)},
}
_METHOD_BASE = {"memit": {}, "encore": {"alpha": 10.0, **_ENCORE}, "alphaedit": {}}


def scaled_layers(n_layers: int) -> list[int]:
    """MEMIT's choice for GPT-J (layers 3-8 of 28) scaled to another depth: five early-middle layers."""
    first = max(1, round(n_layers * 3 / 28))
    return [i for i in range(first, first + 5) if i < n_layers - 1]


def hparams_for(method: str, model_type: str, n_layers: int, **overrides) -> EditHParams:
    """Defaults for `method` on `model_type`, then `overrides` (validated)."""
    if method not in _METHOD_BASE:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(_METHOD_BASE))}")
    values = DEFAULTS[method].get(model_type) or {"layers": scaled_layers(n_layers), **_METHOD_BASE[method]}
    return EditHParams(**{**values, **overrides})
