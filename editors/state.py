"""Editor state: everything an editor accumulates across batches, saved and loaded as one file.

Holds the context prefixes generated once by the unedited model, the per-layer sums of
earlier edits' key outer products (sum_p K_p K_p^T), AlphaEdit's null-space projections,
and the edit count. Nothing lives in module globals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class EditorState:
    layers: list[int]  # edited layers
    context_templates: list[str] = field(default_factory=list)  # "{prefix}. {}" templates
    kkt: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sum_p K_p K_p^T (float64)
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # AlphaEdit null-space projector per layer
    n_edits: int = 0  # edits accumulated in kkt
    devices: dict[int, torch.device] = field(default_factory=dict)  # layer -> where its tensors live (default CPU)
    value_anchor: float = 0.0  # NAS: mean ||v*|| of the first (pilot) edits on the base model; 0 = not yet measured

    def place(self, devices: dict[int, torch.device]) -> None:
        """Keep each layer's key sum and projection on `devices[layer]` (its weight's device) from now on."""
        self.devices = dict(devices)
        for store in (self.kkt, self.projections):
            for layer, t in store.items():
                store[layer] = t.to(self.device(layer))

    def device(self, layer: int) -> torch.device:
        return self.devices.get(layer, torch.device("cpu"))

    def prev_kkt(self, layer: int, dim: int) -> torch.Tensor:
        if layer not in self.kkt:
            self.kkt[layer] = torch.zeros(dim, dim, dtype=torch.float64, device=self.device(layer))
        return self.kkt[layer]

    def add_keys(self, keys: dict[int, torch.Tensor], sign: float = 1.0) -> None:
        """Add (sign=+1) or remove (sign=-1) a batch's keys K (d_in, n): kkt += sign * K K^T."""
        n = 0
        for layer, k in keys.items():
            k64 = k.detach().to(self.device(layer), torch.float64)
            self.prev_kkt(layer, k64.shape[0]).add_(sign * (k64 @ k64.T))
            n = k64.shape[1]
        self.n_edits += int(sign) * n

    def save(self, path: Path) -> None:
        tensors = {f"kkt.{l}": t.cpu().contiguous() for l, t in self.kkt.items()}
        tensors |= {f"proj.{l}": t.cpu().contiguous() for l, t in self.projections.items()}
        meta = {"layers": self.layers, "context_templates": self.context_templates, "n_edits": self.n_edits,
                "value_anchor": self.value_anchor}
        tmp = Path(path).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "EditorState":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
        tensors = load_file(str(path))
        pick = lambda prefix: {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith(prefix)}
        return cls(meta["layers"], meta["context_templates"], pick("kkt."), pick("proj."), meta["n_edits"],
                   value_anchor=meta.get("value_anchor", 0.0))
