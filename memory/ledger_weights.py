"""The ledger's tensors: base copies of the edited layers, each batch's delta and keys (hash-checked on load), the
layer fingerprints recorded at each commit, and the weights they rebuild (base + committed deltas, in commit order).

A mixin of memory.ledger.Ledger, which brings the connection (`db`), the tensor files (`blobs`) and `transaction()`.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from editors.arch import weight_view
from editors.delta import EditDelta, add_low_rank
from editors.entity_memory import MemoryWrite, merge_writes
from editors.models import fingerprint
from memory.blobs import (BlobStore, Fingerprint, LedgerMismatch, hash_tensors, keys_from_tensors,
                          layer_fingerprint, weight_matches, weight_rtol)


def _add_delta(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """The same arithmetic as EditDelta.apply (sign=+1), so rebuilds reproduce live weights bit for bit."""
    add_low_rank(w, u, v, 1.0)


class WeightsMixin:
    """Stored tensors and the weights they rebuild."""

    db: sqlite3.Connection
    root: Path
    blobs: BlobStore
    _expected: dict[int, torch.Tensor] | None

    def load_delta(self, batch_id: int) -> EditDelta:
        """The batch's delta, checked against its recorded content hash."""
        digest = self._batch_row(batch_id)["delta_hash"]
        delta = EditDelta.from_tensors(self.blobs.load("deltas", digest))
        if delta.content_hash() != digest:
            raise LedgerMismatch(f"delta file of batch {batch_id} does not match its hash {digest[:12]} (tampered?)")
        return delta

    def load_keys(self, batch_id: int) -> dict[int, torch.Tensor]:
        digest = self._batch_row(batch_id)["keys_hash"]
        tensors = self.blobs.load("keys", digest)
        if hash_tensors(tensors) != digest:
            raise LedgerMismatch(f"keys file of batch {batch_id} does not match its hash {digest[:12]} (tampered?)")
        return keys_from_tensors(tensors)

    def _base(self) -> dict[int, torch.Tensor]:
        out = {}
        for r in self.db.execute("SELECT layer, hash FROM base_layers"):
            tensors = self.blobs.load("base", r["hash"])
            if hash_tensors(tensors) != r["hash"]:
                raise LedgerMismatch(f"base copy of layer {r['layer']} does not match its hash (tampered?)")
            out[r["layer"]] = tensors["weight"]
        return out

    def base_fingerprint(self) -> str | None:
        """editors.models.fingerprint of the base model this ledger was attached to."""
        return self._meta("base_fingerprint")

    def tracked_layers(self) -> list[int]:
        return [r["layer"] for r in self.db.execute("SELECT layer FROM base_layers ORDER BY layer")]

    # ------------------------------------------------------------------ model state

    def _committed_ids(self) -> list[int]:
        return [r["id"] for r in self.db.execute("SELECT id FROM batches WHERE status = 'committed' ORDER BY id")]

    def _build(self, batch_ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """Tracked layers = base copies + the given batches' deltas, in order."""
        weights = {layer: w.clone() for layer, w in self._base().items()}
        for bid in batch_ids:
            for d in self.load_delta(bid).layers:
                _add_delta(weights[d.layer], d.u, d.v)
        return weights

    def memory_write(self) -> MemoryWrite | None:
        """Entity-memory slots of the committed batches, in commit order (a later slot of a subject replaces an
        earlier one); None when no committed batch wrote any. Rollback changes which batches count, so the
        memory after a rollback is exactly the memory before the rolled-back batches."""
        return merge_writes([self.load_delta(b).memory for b in self._committed_ids()])

    def expected_weights(self) -> dict[int, torch.Tensor]:
        """Tracked layers as they must be in the model now (base + committed deltas), cached per ledger."""
        if self._expected is None:
            self._expected = self._build(self._committed_ids())
        return self._expected

    def _stored_fingerprints(self) -> dict[int, Fingerprint]:
        raw = self._meta("layers_fingerprint")
        return {int(k): v for k, v in json.loads(raw).items()} if raw else {}

    def _store_fingerprints(self, weights: Mapping[int, torch.Tensor]) -> None:
        fps = self._stored_fingerprints() | {layer: layer_fingerprint(w, layer) for layer, w in weights.items()}
        self._set_meta("layers_fingerprint", json.dumps({str(k): v for k, v in fps.items()}))

    def attach(self, model: nn.Module, layers: Iterable[int]) -> None:
        """Bind a freshly loaded base model: check it is the ledger's base, store base copies of
        `layers` not yet tracked, then rebuild base + committed deltas into it (load_into)."""
        fp = fingerprint(model)
        stored = self._meta("base_fingerprint")
        if stored is not None and stored != fp:
            raise LedgerMismatch(f"model fingerprint {fp} differs from the ledger's base model {stored}; "
                                 f"this ledger ({self.root}) was built on another model")
        new = sorted(set(layers) - set(self.tracked_layers()))
        with self.transaction():
            self._set_meta("base_fingerprint", fp)
            snaps = {}
            for layer in new:
                w = weight_view(model, layer).detach().cpu().clone().contiguous()
                digest = hash_tensors({"weight": w})
                self.blobs.write("base", digest, {"weight": w})
                self.db.execute("INSERT INTO base_layers VALUES (?, ?, ?)", (layer, digest, json.dumps(list(w.shape))))
                snaps[layer] = w
            self._store_fingerprints(snaps)
            if new:
                self.log_event("attach", f"tracking base weights of layer(s) {new}", data={"layers": new})
        self._expected = None
        self.load_into(model)

    def load_into(self, model: nn.Module) -> None:
        """Rebuild base + committed deltas, check the stored fingerprint, write the layers into `model`."""
        weights = self.expected_weights()
        stored = self._stored_fingerprints()
        for layer, w in weights.items():
            if layer in stored and not weight_matches(w, layer, stored[layer]):
                self._expected = None
                raise LedgerMismatch(f"layer {layer} rebuilt from base + committed deltas does not match the "
                                     f"fingerprint recorded at the last commit; the ledger at {self.root} is "
                                     "inconsistent (run `kagent verify`)")
        self.restore(model)

    def restore(self, model: nn.Module) -> None:
        """Write the expected tracked layers into `model` (discards any uncommitted delta)."""
        with torch.no_grad():
            for layer, w in self.expected_weights().items():
                view = weight_view(model, layer)
                view.copy_(w.to(view.device, view.dtype))

    def check_model(self, model: nn.Module, weights: Mapping[int, torch.Tensor] | None = None) -> None:
        """Raise LedgerMismatch unless the model's tracked layers equal `weights` (default: expected)."""
        weights = self.expected_weights() if weights is None else weights
        for layer, w in weights.items():
            got = weight_view(model, layer).detach().to("cpu", torch.float64)
            err = float((got - w.double()).norm() / w.double().norm().clamp_min(1e-12))
            if err > weight_rtol(w.dtype):
                raise LedgerMismatch(f"layer {layer} of the model differs from base + committed deltas "
                                     f"(relative error {err:.2e}); apply exactly the committed delta before commit")
