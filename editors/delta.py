"""Low-rank weight deltas: the unit the editors produce and the ledger stores.

A batch's update to one layer is Delta = U @ V.T in the weight's (out, in) orientation.
Applying is a stack: deltas are merged in order and unmerged in reverse. `apply` checks
`isfinite` before writing (peft's safe_merge); the ledger restores weights exactly from
base weights plus the committed stack, so subtraction round-off never accumulates. Factors are kept in
fp32 whatever the model's dtype; `add_low_rank` forms U V^T in fp32 and casts the sum once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editors.arch import weight_view
from editors.entity_memory import MemoryWrite, merge_writes


def add_low_rank(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sign: float = 1.0) -> None:
    """w += sign * U V^T, the product and the sum computed in fp32 (or w's dtype when wider) and cast to w's dtype
    once: a bf16 or fp16 weight is rounded a single time per delta; an fp32 weight gets exactly `w.add_(U V^T)`."""
    wide = torch.promote_types(w.dtype, torch.float32)
    update = (sign * u.to(w.device, wide)) @ v.to(w.device, wide).T
    if wide == w.dtype:
        w.add_(update)
    else:
        w.copy_(w.to(wide).add_(update))


class NonFiniteDelta(ValueError):
    """A delta holds NaN or Inf and must not be written into weights."""


@dataclass
class LayerDelta:
    layer: int  # decoder layer index
    u: torch.Tensor  # (out, r)
    v: torch.Tensor  # (in, r)

    def dense(self) -> torch.Tensor:
        return self.u.double() @ self.v.double().T


@dataclass
class EditDelta:
    """All updates of one batch: low-rank weight updates and/or entity-memory slots."""

    layers: list[LayerDelta] = field(default_factory=list)
    memory: MemoryWrite | None = None  # entity-memory slots the batch writes (editors.entity_memory)

    def by_layer(self) -> dict[int, LayerDelta]:
        return {d.layer: d for d in self.layers}

    def then(self, other: "EditDelta") -> "EditDelta":
        """This delta followed by `other`, as one: factors side by side (U1 V1^T + U2 V2^T), later slots win."""
        mine, theirs = self.by_layer(), other.by_layer()
        layers = []
        for layer in sorted(mine.keys() | theirs.keys()):
            parts = [d for d in (mine.get(layer), theirs.get(layer)) if d is not None]
            layers.append(LayerDelta(layer, torch.cat([d.u for d in parts], 1), torch.cat([d.v for d in parts], 1)))
        return EditDelta(layers, merge_writes([self.memory, other.memory]))

    def check_finite(self) -> None:
        for d in self.layers:
            if not (torch.isfinite(d.u).all() and torch.isfinite(d.v).all()):
                raise NonFiniteDelta(f"delta for layer {d.layer} contains NaN or Inf; refusing to write weights")
        if self.memory is not None and not torch.isfinite(self.memory.deltas).all():
            raise NonFiniteDelta("entity-memory deltas contain NaN or Inf; refusing to write them")

    @torch.no_grad()
    def apply(self, model: nn.Module, sign: float = 1.0) -> None:
        """Add (sign=+1) or subtract (sign=-1) U V^T to each edited weight (memory slots are the memory's)."""
        self.check_finite()
        for d in self.layers:
            add_low_rank(weight_view(model, d.layer), d.u, d.v, sign)

    def revert(self, model: nn.Module) -> None:
        self.apply(model, sign=-1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for d in self.layers:
            out[f"layer.{d.layer}.u"] = d.u.detach().float().cpu().contiguous()
            out[f"layer.{d.layer}.v"] = d.v.detach().float().cpu().contiguous()
        if self.memory is not None:
            out |= self.memory.tensors()
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "EditDelta":
        layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layer.")})
        return EditDelta([LayerDelta(i, tensors[f"layer.{i}.u"], tensors[f"layer.{i}.v"]) for i in layers],
                         MemoryWrite.from_tensors(tensors))

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        save_file(self.tensors(), str(path))

    @staticmethod
    def load(path: Path) -> "EditDelta":
        return EditDelta.from_tensors(load_file(str(path)))
