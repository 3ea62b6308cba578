"""The ledger's tensors: base copies of the edited layers, each batch's delta and keys (hash-checked on load), the
layer fingerprints recorded at each commit, and the weights they rebuild (base + committed deltas, in commit order).

A mixin of memory.ledger.Ledger, which brings the connection (`db`), the tensor files (`blobs`) and `transaction()`.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Mapping, Sequence

import torch

from editors.delta import EditDelta, add_low_rank
from editors.entity_memory import MemoryWrite, merge_writes
from memory.blobs import (BlobStore, Fingerprint, LedgerError, LedgerMismatch, hash_tensors, keys_from_tensors,
                          layer_fingerprint, weight_matches)


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

    def committed_ids(self) -> list[int]:
        """Ids of the batches committed now, in commit order: the stack the model must hold."""
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
        return merge_writes([self.load_delta(b).memory for b in self.committed_ids()])

    def expected_weights(self) -> dict[int, torch.Tensor]:
        """Tracked layers as they must be in the model now (base + committed deltas), cached per ledger."""
        if self._expected is None:
            self._expected = self._build(self.committed_ids())
        return self._expected

    def _stored_fingerprints(self) -> dict[int, Fingerprint]:
        raw = self._meta("layers_fingerprint")
        return {int(k): v for k, v in json.loads(raw).items()} if raw else {}

    def _store_fingerprints(self, weights: Mapping[int, torch.Tensor]) -> None:
        fps = self._stored_fingerprints() | {layer: layer_fingerprint(w, layer) for layer, w in weights.items()}
        self._set_meta("layers_fingerprint", json.dumps({str(k): v for k, v in fps.items()}))

    def attach_base(self, model_fingerprint: str, base: Mapping[int, torch.Tensor]) -> None:
        """Bind the ledger to a freshly loaded base model, given its fingerprint and its weights of the layers to
        track (memory/model_sync.attach reads them): refuse another base model, store base copies of the layers
        not yet tracked. The model itself is brought to base + committed deltas by the caller."""
        fp = model_fingerprint
        stored = self._meta("base_fingerprint")
        if stored is not None and stored != fp:
            raise LedgerMismatch(f"model fingerprint {fp} differs from the ledger's base model {stored}; "
                                 f"this ledger ({self.root}) was built on another model")
        new = sorted(set(base) - set(self.tracked_layers()))
        with self.transaction():
            self._set_meta("base_fingerprint", fp)
            snaps = {}
            for layer in new:
                w = base[layer].detach().cpu().clone().contiguous()
                digest = hash_tensors({"weight": w})
                self.blobs.write("base", digest, {"weight": w})
                self.db.execute("INSERT INTO base_layers VALUES (?, ?, ?)", (layer, digest, json.dumps(list(w.shape))))
                snaps[layer] = w
            self._store_fingerprints(snaps)
            if new:
                self.log_event("attach", f"tracking base weights of layer(s) {new}", data={"layers": new})
        self._expected = None

    def checked_weights(self) -> dict[int, torch.Tensor]:
        """expected_weights(), after checking each layer against the fingerprint stored at the last commit
        (LedgerMismatch, cache dropped, when one differs): what a freshly loaded model must be given."""
        weights = self.expected_weights()
        stored = self._stored_fingerprints()
        for layer, w in weights.items():
            if layer in stored and not weight_matches(w, layer, stored[layer]):
                self._expected = None
                raise LedgerMismatch(f"layer {layer} rebuilt from base + committed deltas does not match the "
                                     f"fingerprint recorded at the last commit; the ledger at {self.root} is "
                                     "inconsistent (run `kagent verify`)")
        return weights

    def weights_after(self, delta: EditDelta) -> dict[int, torch.Tensor]:
        """The layers `delta` edits, as they are after adding it to expected_weights() (copies)."""
        expected = self.expected_weights()
        missing = sorted({d.layer for d in delta.layers} - set(expected))
        if missing:
            raise LedgerError(f"layer(s) {missing} are not tracked; attach them (memory.model_sync.attach) before "
                              "editing them")
        out = {}
        for d in delta.layers:
            w = out.get(d.layer, expected[d.layer].clone())
            _add_delta(w, d.u, d.v)
            out[d.layer] = w
        return out

    def weights_from_base(self, delta: EditDelta) -> dict[int, torch.Tensor]:
        """Every tracked layer as base + `delta` alone (a consolidation's weights)."""
        weights = self._build([])
        for d in delta.layers:
            _add_delta(weights[d.layer], d.u, d.v)
        return weights
