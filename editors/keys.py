"""Keys and current outputs at the subject's last token, layer after layer, without re-running the bottom.

MEMIT edits layers in order: the keys of layer l are read after layers < l were updated. A
plain forward per layer repeats the whole stack below it every time. `LayerwiseKeys` keeps
the residual stream of every key row at the input of the next block instead, so each block
runs once to read a layer's keys and once more (with its new weight) to move the stream up.
Rotary decoders get that; other architectures get `FullForwardKeys` (same interface, a full
forward per call). `key_source` picks one.
"""
from __future__ import annotations

import torch
from torch import nn

from editors.arch import arch_of, get_module, layers_of, module_name
from editors.hooks import StopForward, capture_input, forward_hook
from editors.values import additive_mask, output_tensor


class LayerwiseKeys:
    """Residual stream of right-padded key rows, advanced one block at a time (no grad)."""

    def __init__(self, model: nn.Module, seqs: list[list[int]], pad: int, row_chunk: int = 256):
        self.model, self.arch, self.blocks = model, arch_of(model), layers_of(model)
        device = next(model.parameters()).device
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        self.mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            self.mask[i, : len(s)] = True
        self.mask = self.mask.to(device)
        self.last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        self.pos = torch.arange(width, device=device)[None].expand(len(seqs), -1)
        self.chunk = row_chunk
        with torch.no_grad():
            self.h = get_module(model, self.arch.embed)(ids.to(device))  # input of block `self.at`
        self.at = 0

    @torch.no_grad()
    def _run(self, h: torch.Tensor, rows: slice | torch.Tensor, block: int) -> torch.Tensor:
        pos = self.pos[rows]
        rope = get_module(self.model, self.arch.rotary)(h, pos)
        mask4 = additive_mask(self.mask[rows], 0, h.dtype)
        return output_tensor(self.blocks[block](h, attention_mask=mask4, position_ids=pos, position_embeddings=rope))

    def _chunks(self):
        return [slice(i, i + self.chunk) for i in range(0, self.h.shape[0], self.chunk)]

    def advance_to(self, layer: int) -> None:
        """Move the stream to the input of block `layer` with the model's current weights."""
        if layer < self.at:
            raise ValueError(f"the key stream is already at block {self.at}, past {layer}")
        for block in range(self.at, layer):
            self.h = torch.cat([self._run(self.h[r], r, block) for r in self._chunks()])
        self.at = layer

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """(rows, d_in): the edited module's input of `layer` at each row's last token."""
        self.advance_to(layer)
        module = get_module(self.model, module_name(self.model, layer))
        out = []
        for r in self._chunks():
            store: list[torch.Tensor] = []
            with capture_input(module, store):
                self._run(self.h[r], r, layer)
            out.append(store[0][torch.arange(store[0].shape[0], device=self.h.device), self.last[r]])
        return torch.cat(out)

    @torch.no_grad()
    def outputs(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), d): output of block `layer` at the last token of `rows`, from the current stream."""
        h = self.h[rows]
        for block in range(self.at, layer + 1):
            h = self._run(h, rows, block)
        return h[torch.arange(len(rows), device=h.device), self.last[rows]]


def _padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(device), mask.to(device), last.to(device)


@torch.no_grad()
def at_last_token(model: nn.Module, seqs: list[list[int]], pad: int, module: nn.Module, kind: str,
                  chunk: int = 256) -> torch.Tensor:
    """The input ("in") or output ("out") of `module` at each sequence's last token, (N, d)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), chunk):
        ids, mask, last = _padded(seqs[i : i + chunk], pad, device)
        store: list[torch.Tensor] = []

        def grab(_m, _a, o):
            store.append(output_tensor(o).detach())
            raise StopForward

        ctx = capture_input(module, store, stop=True) if kind == "in" else forward_hook(module, grab)
        with ctx:
            try:
                model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
        out.append(store[0][torch.arange(len(last), device=device), last])
    return torch.cat(out)


class FullForwardKeys:
    """Same interface as LayerwiseKeys for any architecture: one forward (cut short) per call."""

    def __init__(self, model: nn.Module, seqs: list[list[int]], pad: int):
        self.model, self.seqs, self.pad = model, seqs, pad

    def keys(self, layer: int) -> torch.Tensor:
        module = get_module(self.model, module_name(self.model, layer))
        return at_last_token(self.model, self.seqs, self.pad, module, "in")

    def outputs(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        seqs = [self.seqs[i] for i in rows.tolist()]
        return at_last_token(self.model, seqs, self.pad, layers_of(self.model)[layer], "out")


def key_source(model: nn.Module, seqs: list[list[int]], pad: int) -> LayerwiseKeys | FullForwardKeys:
    """The layer-wise stream for rotary decoders, full forwards otherwise."""
    if arch_of(model).rotary is not None and arch_of(model).embed is not None:
        return LayerwiseKeys(model, seqs, pad)
    return FullForwardKeys(model, seqs, pad)
