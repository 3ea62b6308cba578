"""The model side of the ledger: the ledger stores, these functions bring a model to what it stores and check it.

The ledger (memory/ledger.py) keeps facts, batches and tensors and rebuilds the weights a model must hold
(`expected_weights`: base + committed deltas, in commit order); it never touches a model. Here those weights are
written into a model (`restore`, `load_into`, `attach`), a model is checked against them before anything is
recorded (`check_model`, `commit_applied`, `consolidate_applied`, and export), and a rollback is carried out:
the ledger records it, the model gets the rebuilt weights, the editor state loses (or, for a consolidation, gets
back) the batches' keys, and later batches are replayed through a caller-supplied `recompute`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta
from editors.models import fingerprint
from memory.blobs import LedgerMismatch, weight_rtol
from memory.ledger import Ledger
from memory.record import StoredFact

log = logging.getLogger(__name__)


class KeyState(Protocol):
    """What a rollback needs from the editor state: add or remove a batch's keys."""

    def add_keys(self, keys: dict[int, torch.Tensor], sign: float = 1.0) -> None: ...


Recompute = Callable[[list[StoredFact]], tuple[EditDelta, dict[int, torch.Tensor]]]


@dataclass(frozen=True)
class RollbackReport:
    """What a rollback did."""

    batch_id: int  # the batch rolled back
    fact_ids: list[int]  # its facts (bar those a later batch holds now), now status rolled_back
    replayed: list[tuple[int, int]]  # (old batch, new batch) pairs recomputed after it
    message: str  # one-line summary (also logged and stored as an event)


# ----------------------------------------------------------------------------- weights in and out of a model


def write_layers(model: nn.Module, weights: Mapping[int, torch.Tensor]) -> None:
    """Copy `weights` (layer -> edited weight) into `model`, in its device and dtype."""
    with torch.no_grad():
        for layer, w in weights.items():
            view = weight_view(model, layer)
            view.copy_(w.to(view.device, view.dtype))


def restore(ledger: Ledger, model: nn.Module) -> None:
    """Write the ledger's expected tracked layers into `model` (discards any uncommitted delta)."""
    write_layers(model, ledger.expected_weights())


def load_into(ledger: Ledger, model: nn.Module) -> None:
    """Rebuild base + committed deltas, check them against the stored fingerprints, write them into `model`."""
    write_layers(model, ledger.checked_weights())


def attach(ledger: Ledger, model: nn.Module, layers: Iterable[int]) -> None:
    """Bind a freshly loaded base model: the ledger checks it is its base and stores copies of `layers` not yet
    tracked; then base + committed deltas are rebuilt into the model (load_into)."""
    new = sorted(set(layers) - set(ledger.tracked_layers()))
    base = {layer: weight_view(model, layer).detach().cpu().clone().contiguous() for layer in new}
    ledger.attach_base(fingerprint(model), base)
    load_into(ledger, model)


def check_model(ledger: Ledger, model: nn.Module, weights: Mapping[int, torch.Tensor] | None = None) -> None:
    """Raise LedgerMismatch unless the model's tracked layers equal `weights` (default: the ledger's expected)."""
    weights = ledger.expected_weights() if weights is None else weights
    for layer, w in weights.items():
        got = weight_view(model, layer).detach().to("cpu", torch.float64)
        err = float((got - w.double()).norm() / w.double().norm().clamp_min(1e-12))
        if err > weight_rtol(w.dtype):
            raise LedgerMismatch(f"layer {layer} of the model differs from base + committed deltas "
                                 f"(relative error {err:.2e}); apply exactly the committed delta before commit")


# ----------------------------------------------------------------------------- recording what the model holds


def commit_applied(ledger: Ledger, model: nn.Module, facts: Sequence[StoredFact | int], delta: EditDelta,
                   keys: Mapping[int, torch.Tensor], metrics: Mapping[str, Mapping[str, float]] | None = None,
                   method: str = "encore", *, replay_of: int | None = None,
                   failed: Mapping[int, str] | None = None) -> int:
    """Commit a batch whose delta has been applied to `model`: the model must hold the ledger's weights plus
    `delta` (LedgerMismatch otherwise, nothing written); then Ledger.commit."""
    check_model(ledger, model, ledger.expected_weights() | ledger.weights_after(delta))
    return ledger.commit(facts, delta, keys, metrics, method, replay_of=replay_of, failed=failed)


def consolidate_applied(ledger: Ledger, model: nn.Module, delta: EditDelta, keys: Mapping[int, torch.Tensor],
                        metrics: Mapping[str, Mapping[str, float]], method: str, *,
                        tiers: Mapping[int, str] | None = None) -> int:
    """Record a consolidation whose weights (base + `delta`) `model` holds (checked first); Ledger.consolidate."""
    check_model(ledger, model, ledger.weights_from_base(delta))
    return ledger.consolidate(delta, keys, metrics, method, tiers=tiers)


# ----------------------------------------------------------------------------- rollback


def rollback(ledger: Ledger, batch_id: int, model: nn.Module, state: KeyState | None = None,
             recompute: Recompute | None = None, reason: str = "rolled back by user") -> RollbackReport:
    """Undo a committed batch exactly (no counter-edit). For an older batch, later batches are
    reverted too and replayed through `recompute(facts) -> (delta, keys)`, as new batches."""
    info = ledger.batch(batch_id)
    if info.status == "consolidated":  # un-consolidate (exact), then roll the batch back out of its chain
        first = rollback(ledger, info.covered_by, model, state, recompute,
                         f"to roll back batch {batch_id}, which it covers")
        then = rollback(ledger, batch_id, model, state, recompute, reason)
        return RollbackReport(batch_id, then.fact_ids, then.replayed, f"{first.message}; then {then.message}")
    undone = ledger.undo(batch_id, reason, replay=recompute is not None)
    if state is not None:
        for keys in undone.keys_out:
            state.add_keys(keys, sign=-1.0)
        for keys in undone.keys_back:
            state.add_keys(keys)
    restore(ledger, model)
    replayed = _replay(ledger, undone.later, model, state, recompute) if undone.later else []
    msg = f"rolled back {undone.what}: {reason}"
    if replayed:
        msg += "; replayed later batches " + ", ".join(f"{o}->{n}" for o, n in replayed) + " with recomputed deltas"
    ledger.log_event("rollback", msg, batch_id, {"facts": undone.fact_ids, "replayed": replayed})
    if replayed:
        log.warning(msg)
    return RollbackReport(batch_id, undone.fact_ids, replayed, msg)


def _replay(ledger: Ledger, later: Sequence[int], model: nn.Module, state: KeyState | None,
            recompute: Recompute) -> list[tuple[int, int]]:
    replayed = []
    for old in later:
        facts = [f for f in ledger.batch_facts(old) if f.status == "pending"]
        if not facts:
            continue
        delta, keys = recompute(facts)
        delta.apply(model)
        if state is not None:
            state.add_keys(keys)
        new = commit_applied(ledger, model, facts, delta, keys, None, ledger.batch(old).method, replay_of=old)
        ledger.log_event("replay", f"replayed batch {old} as batch {new} ({len(facts)} fact(s))", new,
                         {"replay_of": old})
        replayed.append((old, new))
    return replayed


def rollback_to(ledger: Ledger, batch_id: int, model: nn.Module, state: KeyState | None = None,
                reason: str = "rolled back by user") -> list[RollbackReport]:
    """Roll back every committed batch after `batch_id` (0 = all), latest first; no replay needed."""
    reports = []
    while later := [b for b in ledger.committed_ids() if b > batch_id]:  # a consolidation recommits its chain
        reports.append(rollback(ledger, later[-1], model, state, reason=f"{reason} (rollback to batch {batch_id})"))
    return reports
