"""Knowledge-superposition statistics: whitened overlaps between edit keys.

Keys k (inputs of an edited module at the subject's last token) are whitened with C0^-1/2, where C0 = E[k k^T] is
the module's uncentred input covariance, then normalised; the overlap of two keys is the cosine of their whitened
forms. Orthogonal (non-superposed) knowledge gives overlaps concentrated at 0; heavy tails (large excess kurtosis,
tail mass, max) mean edits share directions and can interfere. We measure a batch's keys against each other and
against the stored keys of earlier edits (`superposition_metrics`: at the last edited layer, the batch's metric row).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

TAIL = 0.1  # |overlap| above this counts toward the tail mass (about 4 sigma for random keys in d >= 576)


@dataclass(frozen=True)
class OverlapStats:
    n: int  # number of overlaps measured
    mean: float
    std: float
    kurtosis: float  # excess kurtosis (0 for a Gaussian)
    tail: float  # fraction of |overlap| > TAIL
    max: float  # largest |overlap|

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


EMPTY = OverlapStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)


def whitener(c0: torch.Tensor, rel_eps: float = 1e-6) -> torch.Tensor:
    """C0^-1/2 (symmetric), with eigenvalues floored at rel_eps * the largest one; float64."""
    c = c0.double()
    c = 0.5 * (c + c.T)
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(rel_eps * vals.max().clamp_min(1e-30))
    return (vecs * vals.rsqrt()) @ vecs.T


def whiten(keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Whitened, unit-norm keys; `keys` is (d, n) with one key per column."""
    z = w @ keys.double().to(w.device)
    return z / z.norm(dim=0, keepdim=True).clamp_min(1e-30)


def overlap_stats(values: torch.Tensor, tail: float = TAIL) -> OverlapStats:
    v = values.double().flatten()
    if v.numel() == 0:
        return EMPTY
    mean = v.mean()
    std = v.std(unbiased=False)
    kurt = ((v - mean) ** 4).mean() / std.clamp_min(1e-30) ** 4 - 3.0 if v.numel() > 1 and std > 0 else v.new_tensor(0.0)
    return OverlapStats(int(v.numel()), float(mean), float(std), float(kurt), float((v.abs() > tail).double().mean()),
                        float(v.abs().max()))


def within_overlaps(z: torch.Tensor) -> torch.Tensor:
    """Pairwise overlaps among the columns of whitened keys `z` (upper triangle, no diagonal)."""
    n = z.shape[1]
    gram = z.T @ z
    i, j = torch.triu_indices(n, n, offset=1)
    return gram[i, j]


def superposition(keys: torch.Tensor, prior: torch.Tensor | None, c0: torch.Tensor,
                  w: torch.Tensor | None = None) -> dict[str, float]:
    """Overlap statistics of a batch's keys (d, n) with each other (`within_*`) and with earlier keys (`prior_*`);
    `w` is C0's whitener when the caller cached it (else computed from c0)."""
    w = whitener(c0) if w is None else w
    z = whiten(keys, w)
    out = overlap_stats(within_overlaps(z)).as_dict("within_")
    if prior is not None and prior.numel():
        out |= overlap_stats(z.T @ whiten(prior, w)).as_dict("prior_")
    else:
        out |= EMPTY.as_dict("prior_")
    return out


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
