"""Keys and current outputs at the subject's last token, layer after layer, without re-running the bottom.

MEMIT edits layers in order: the keys of layer l are read after layers < l were updated. A
plain forward per layer repeats the whole stack below it every time. `LayerwiseKeys` keeps
the residual stream of every key row at the input of the next block instead, so each block
runs once to read a layer's keys and once more (with its new weight) to move the stream up.
Rotary decoders get that; other architectures get `FullForwardKeys` (same interface, a full
forward per call). `key_source` picks one. Under a device map (accelerate) each block runs on its own
device: row indices stay on the input device and are moved to whichever device a layer's tensors are on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editors.arch import arch_of, get_module, layers_of, module_name
from editors.devices import input_device
from editors.forward import PrefixKV, additive_mask, output_tensor, run_blocks
from editors.hooks import StopForward, capture_input, forward_hook


@dataclass
class _Stream:
    """Right-padded rows that begin with the same shared context (or none), and that context's stream."""

    rows: torch.Tensor  # indices of these rows among the source's rows
    h: torch.Tensor  # (n, W, d) residual stream of each row's own tokens (after the context)
    mask: torch.Tensor  # (n, W) bool, real tokens
    pos: torch.Tensor  # (n, W) position ids (the context takes the first ones)
    last: torch.Tensor  # (n,) column of each row's last token
    ctx: torch.Tensor | None  # (1, c, d) residual stream of the shared context


def _context_of(seq: list[int], contexts: list[list[int]]) -> int:
    for j, c in enumerate(contexts):
        if 0 < len(c) < len(seq) and seq[: len(c)] == c:
            return j
    return -1


class LayerwiseKeys:
    """Residual stream of key rows, advanced one block at a time (no grad).

    Rows that begin with one of `contexts` (the editor's context prefixes) keep only their own
    tokens; the context's stream is kept once and lends its keys/values to every such row.
    """

    def __init__(self, model: nn.Module, seqs: list[list[int]], pad: int, contexts: list[list[int]] | None = None,
                 row_chunk: int = 256):
        self.model = model
        self.n = len(seqs)
        device = input_device(model)
        contexts = contexts or []
        which = [_context_of(s, contexts) for s in seqs]
        embed = get_module(model, arch_of(model).embed)
        self.streams: list[_Stream] = []
        with torch.no_grad():
            for c in sorted(set(which)):
                members = [i for i, w in enumerate(which) if w == c]
                n_ctx = len(contexts[c]) if c >= 0 else 0
                for start in range(0, len(members), row_chunk):
                    rows = members[start : start + row_chunk]
                    ids, mask, last = _padded([seqs[i][n_ctx:] for i in rows], pad, device)
                    pos = (n_ctx + torch.arange(ids.shape[1], device=device))[None].expand_as(ids)
                    ctx = embed(torch.tensor([contexts[c]], device=device)) if c >= 0 else None
                    self.streams.append(_Stream(torch.tensor(rows, device=device), embed(ids), mask.bool(), pos,
                                                last, ctx))
        self.at = 0  # every stream is at the input of this block

    def _context_step(self, ctx: torch.Tensor | None, block: int, n: int) -> tuple[PrefixKV, torch.Tensor | None]:
        """The context's keys/values at `block` for n rows, and its stream after the block."""
        if ctx is None:
            return PrefixKV(), None
        c = ctx.shape[1]
        rec = PrefixKV(record_upto=c)
        pos = torch.arange(c, device=ctx.device)[None]
        mask = torch.ones(1, c, dtype=torch.bool, device=ctx.device)
        out = run_blocks(self.model, ctx, pos, additive_mask(mask, 0, ctx.dtype), rec, [block])
        k, v = rec.recorded[block]
        return PrefixKV({block: (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))}), out

    def _own_step(self, s: _Stream, sel: torch.Tensor, h: torch.Tensor, block: int, cache: PrefixKV) -> torch.Tensor:
        c = 0 if s.ctx is None else s.ctx.shape[1]
        mask = torch.cat([s.mask.new_ones(len(sel), c), s.mask[sel]], 1)
        return run_blocks(self.model, h, s.pos[sel], additive_mask(mask, c, h.dtype), cache, [block])

    def advance_to(self, layer: int) -> None:
        """Move the streams to the input of block `layer` with the model's current weights."""
        if layer < self.at:
            raise ValueError(f"the key stream is already at block {self.at}, past {layer}")
        with torch.no_grad():
            for block in range(self.at, layer):
                for s in self.streams:
                    everyone = torch.arange(len(s.rows), device=s.mask.device)
                    cache, ctx = self._context_step(s.ctx, block, len(s.rows))
                    s.h, s.ctx = self._own_step(s, everyone, s.h, block, cache), ctx
        self.at = layer

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """(rows, d_in): the edited module's input of `layer` at each row's last token."""
        self.advance_to(layer)
        module = get_module(self.model, module_name(self.model, layer))
        out = None
        for s in self.streams:
            everyone = torch.arange(len(s.rows), device=s.mask.device)
            cache, _ = self._context_step(s.ctx, layer, len(s.rows))
            store: list[torch.Tensor] = []
            with capture_input(module, store):
                self._own_step(s, everyone, s.h, layer, cache)
            k = store[0][everyone.to(store[0].device), s.last.to(store[0].device)]  # the layer's device (device_map)
            out = k.new_empty(self.n, k.shape[-1]) if out is None else out
            out[s.rows.to(out.device)] = k.to(out.device)
        return out

    @torch.no_grad()
    def outputs(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), d): output of block `layer` at the last token of `rows`, from the current streams."""
        rows = rows.to(self.streams[0].rows.device)
        where = torch.full((self.n,), -1, dtype=torch.long, device=rows.device)
        where[rows] = torch.arange(len(rows), device=rows.device)
        out = None
        for s in self.streams:
            sel = torch.nonzero(where[s.rows] >= 0)[:, 0]
            if len(sel) == 0:
                continue
            h, ctx = s.h[sel.to(s.h.device)], s.ctx
            for block in range(self.at, layer + 1):
                cache, ctx = self._context_step(ctx, block, len(sel))
                h = self._own_step(s, sel, h, block, cache)
            o = h[torch.arange(len(sel), device=h.device), s.last[sel].to(h.device)]
            out = o.new_empty(len(rows), o.shape[-1]) if out is None else out
            out[where[s.rows[sel]].to(out.device)] = o.to(out.device)
        return out


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
    device = input_device(model)
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
        got = store[0]
        out.append(got[torch.arange(len(last), device=got.device), last.to(got.device)].to(device))
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


def key_source(model: nn.Module, seqs: list[list[int]], pad: int,
               contexts: list[list[int]] | None = None) -> LayerwiseKeys | FullForwardKeys:
    """The layer-wise stream for rotary decoders (sharing `contexts`), full forwards otherwise."""
    if arch_of(model).rotary is not None and arch_of(model).embed is not None:
        return LayerwiseKeys(model, seqs, pad, contexts)
    return FullForwardKeys(model, seqs, pad)
