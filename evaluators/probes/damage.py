"""The guard's damage measure with a noise floor: the probe facts' answer margins before and after a batch.

Per probe fact (the shipped `probe_facts.jsonl`, evaluators/probes/facts.py) `fact_margins` is the answer's logit
margin over the best other token; a batch's `damage` is the mean drop of that margin over the probe facts, with its
paired standard error; `random_update` is the same-norm random update whose damage is the floor a real batch is
compared with (agent/guard.py), and `random_drops` that floor per probe fact, averaged over several draws.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors.arch import weight_view
from editors.delta import EditDelta, LayerDelta
from evaluators.monitors.norms import lowrank_norm
from evaluators.probes.facts import KnownFact, ProbeFact
from evaluators.scoring import answer_margins

MARGIN_BATCH = 128  # probe facts per forward in `fact_margins` (short prompts: the padding stays small)


def fact_margins(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact | ProbeFact],
                 batch_size: int = MARGIN_BATCH, progress: bool = False) -> torch.Tensor:
    """Per fact, float64 (n,): the mean over the answer's tokens (teacher-forced) of logit(answer token) -
    max logit(other token). Positive exactly where each token is the greedy choice on average; it moves
    continuously with any change of the model, so small damage shows long before an answer flips."""
    if not facts:
        return torch.zeros(0, dtype=torch.float64)
    margins, _ = answer_margins(model, tok, [f.prompt for f in facts], [f.target for f in facts],
                                batch_size=batch_size, progress=progress)
    return torch.stack([m.double().mean() for m in margins])


@dataclass(frozen=True)
class Damage:
    mean: float  # mean over probe facts of (margin before - margin after); > 0 = the facts lost margin
    se: float  # its standard error, from the per-fact paired differences
    n: int  # probe facts


def damage(before: torch.Tensor, after: torch.Tensor) -> Damage:
    """The damage of going from margins `before` to `after` (same facts, same order), paired per fact."""
    if before.shape != after.shape:
        raise ValueError(f"margins of {tuple(before.shape)} and {tuple(after.shape)} facts are not paired")
    d = (before.double() - after.double())
    n = d.numel()
    if n == 0:
        return Damage(0.0, 0.0, 0)
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    return Damage(float(d.mean()), se, n)


def layer_norms_of(delta: EditDelta) -> dict[int, float]:
    """||U V^T||_F of every layer of `delta`, without forming the product."""
    return {d.layer: lowrank_norm(d.u, d.v) for d in delta.layers}


def random_update(model: nn.Module, norms: dict[int, float], generator: torch.Generator,
                  rank: int = 0) -> EditDelta:
    """A random update with Frobenius norm `norms[l]` in each layer l: Gaussian U V^T of `rank` (0 = dense:
    U is the identity's share of a full-rank Gaussian, stored as U = G, V = I). Its direction ignores what the
    model stores, so its damage is what an update of that size costs by its size alone."""
    out = []
    for layer, norm in sorted(norms.items()):
        o, i = weight_view(model, layer).shape
        if rank:
            u = torch.randn(o, rank, generator=generator, dtype=torch.float64)
            v = torch.randn(i, rank, generator=generator, dtype=torch.float64)
            scale = norm / lowrank_norm(u, v)
        else:
            u = torch.randn(o, i, generator=generator, dtype=torch.float64)
            v = torch.eye(i, dtype=torch.float64)
            scale = norm / float(u.norm())
        out.append(LayerDelta(layer, (u * scale).float(), v.float()))
    return EditDelta(out)


def delta_rank(delta: EditDelta) -> int:
    return max((d.u.shape[1] for d in delta.layers), default=0)


@torch.no_grad()
def random_drops(model: nn.Module, tok, facts: list[ProbeFact], before: torch.Tensor, delta: EditDelta,
                 draws: int, seed: int) -> torch.Tensor:
    """Per probe fact, the margin drop from `before` averaged over `draws` random updates with `delta`'s per-layer
    norms and rank, each added to the model as it is and then taken out exactly (the weights are copied back)."""
    norms = layer_norms_of(delta)
    saved = {l: weight_view(model, l).clone() for l in norms}
    drops = torch.zeros_like(before, dtype=torch.float64)
    try:
        for d in range(draws):
            random_update(model, norms, torch.Generator().manual_seed(seed + d), delta_rank(delta)).apply(model)
            drops += before - fact_margins(model, tok, facts)
            for l, w in saved.items():
                weight_view(model, l).copy_(w)
    finally:
        for l, w in saved.items():
            weight_view(model, l).copy_(w)
    return drops / max(draws, 1)
