"""The target-value optimisation's forward: a chunk's prompt rows in one batch, with a delta at each edit.

Each edit gets a vector delta added to the last edited layer's output at its subject's
last token. All prompt rows of a chunk run in one padded batch per step. Rows are
aligned so that every suffix starts at the same column: the prefix (unaffected by the
delta) is computed once without gradient, and each step recomputes only the suffix in
the layers above the edited one (fast path, rotary decoders, on editors/forward.py), with
logits only at the positions the loss reads. The loop that drives it (loss, Adam, stopping
rules; finished edits drop out of the batch) is editors/optimise.py, which imports this
module and never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from editors.arch import arch_of, get_module, layers_of
from editors.forward import PrefixKV, additive_mask, output_tensor, run_blocks
from editors.hooks import forward_hook
from editors.prompts import PromptRow


@dataclass
class Batch:
    """Row-aligned tensors of a chunk (row dim first); `select` keeps a subset of rows."""

    ids: torch.Tensor  # (B, P+S) left-padded prefix | right-padded suffix
    mask: torch.Tensor  # (B, P+S) bool, real tokens
    pos: torch.Tensor  # (B, P+S) position ids
    req: torch.Tensor  # (B,) edit index of each row
    is_kl: torch.Tensor  # (B,) bool
    kid: torch.Tensor  # (B,) running index of the KL rows (-1: not a KL row); stable when rows are dropped
    kw: torch.Tensor  # (B,) float: a KL row's weight in its request's loss
    ctx: torch.Tensor  # (B,) index of the shared context the prefix begins with (-1: none)
    tcol: torch.Tensor  # (B, T) suffix columns read by the loss (col 0 for KL rows)
    ttok: torch.Tensor  # (B, T) target token ids
    tmask: torch.Tensor  # (B, T) bool

    def select(self, rows: torch.Tensor) -> "Batch":
        return Batch(*(getattr(self, f.name)[rows] for f in fields(self)))


def make_batch(rows: list[PromptRow], pad_id: int, device) -> tuple[Batch, int]:
    P = max(len(r.prefix) for r in rows)
    S = max(len(r.suffix) for r in rows)
    T = max(max(len(r.target_cols) for r in rows), 1)
    B = len(rows)
    ids = torch.full((B, P + S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + S, dtype=torch.bool)
    tcol = torch.zeros(B, T, dtype=torch.long)
    ttok = torch.zeros(B, T, dtype=torch.long)
    tmask = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, P - len(r.prefix) : P] = torch.tensor(r.prefix, dtype=torch.long)
        ids[b, P : P + len(r.suffix)] = torch.tensor(r.suffix, dtype=torch.long)
        mask[b, P - len(r.prefix) : P + len(r.suffix)] = True
        n = len(r.target_cols)
        tcol[b, :n] = torch.tensor(r.target_cols) if n else 0
        tcol[b, 0] = len(r.suffix) - 1 if r.is_kl else tcol[b, 0]
        ttok[b, :n] = torch.tensor(r.target_ids, dtype=torch.long) if n else 0
        tmask[b, :n] = True
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    req = torch.tensor([r.request for r in rows])
    is_kl = torch.tensor([r.is_kl for r in rows])
    kid = torch.where(is_kl, is_kl.long().cumsum(0) - 1, -1)
    kw = torch.tensor([r.kl_weight for r in rows], dtype=torch.float32)
    ctx = torch.tensor([r.context for r in rows])
    batch = Batch(ids, mask, pos, req, is_kl, kid, kw, ctx, tcol, ttok, tmask)
    return Batch(*(getattr(batch, f.name).to(device) for f in fields(batch))), P


class SuffixRunner:
    """Runs a chunk's rows with a delta at column P of layer `layer`'s output.

    `precompute` (no grad) records h_L at the suffix columns and the prefix keys/values of
    every layer above. `run(delta_rows)` returns final-norm hidden states at the loss
    positions (B, T, d); with a zero delta they are the unedited model's.
    """

    def __init__(self, model: nn.Module, layer: int):
        self.model, self.layer = model, layer
        self.arch = arch_of(model)
        self.blocks = layers_of(model)
        self.fast = self.arch.rotary is not None
        self.flops = 0.0  # matmul FLOPs of run() calls (forward + input-gradient backward)
        lin = lambda mods: sum(m.weight.numel() for b in mods for m in b.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
        self._above_params = lin(self.blocks[layer + 1 :])
        self._all_params = lin(self.blocks)

    @torch.no_grad()
    def precompute(self, batch: Batch, P: int, contexts: list[list[int]] | None = None) -> None:
        """Prefix keys/values of the blocks above the layer, and h_L at the suffix columns.

        `contexts[j]` are the ids that rows with `batch.ctx == j` begin with: their keys/values
        are computed once and lent to those rows, so the prefix pass runs each row's own tokens only.
        """
        self.batch, self.P = batch, P
        if not self.fast:
            self._generic(batch, None)
            return
        dev = batch.ids.device
        ctx = batch.ctx if contexts else torch.full_like(batch.ctx, -1)
        shared = {c: self._context_kv(contexts[c]) for c in ctx.unique().tolist() if c >= 0}
        n_ctx = torch.tensor([len(contexts[c]) if c >= 0 else 0 for c in ctx.tolist()], device=dev)
        own_len = batch.mask[:, :P].sum(1) - n_ctx
        C, cut = int(n_ctx.max()), P - int(own_len.max())
        own = torch.arange(P, device=dev)[None] >= P - own_len[:, None]  # prefix columns not in the context
        ctx_cols = torch.arange(C, device=dev)[None] >= C - n_ctx[:, None]  # contexts right-aligned in C columns
        mask = torch.cat([ctx_cols, own[:, cut:], batch.mask[:, P:]], 1)
        lent = self._lent_kv(shared, ctx, C)
        rec = PrefixKV(lent, record_upto=C + P - cut)
        emb = get_module(self.model, self.arch.embed)(batch.ids[:, cut:])
        h = run_blocks(self.model, emb, batch.pos[:, cut:], additive_mask(mask, C, emb.dtype), rec,
                       range(self.layer + 1))
        self._hL = h[:, P - cut :]
        # above the edited layer only the prefix is fixed: its keys/values are all run() needs there
        above = range(self.layer + 1, len(self.blocks))
        if P > cut:
            prefix_mask = additive_mask(mask[:, : C + P - cut], C, emb.dtype)
            run_blocks(self.model, h[:, : P - cut], batch.pos[:, cut:P], prefix_mask, rec, above)
        # run() replays only the blocks above the edited layer, on this layout: lent context | own prefix | suffix
        self.kv = {layer: rec.recorded.get(layer, lent.get(layer)) for layer in above}
        self.kv = {layer: kv for layer, kv in self.kv.items() if kv is not None}
        self._mask = mask

    def _context_kv(self, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every block's keys/values of one shared context (1, heads, n, head_dim)."""
        device = self.batch.ids.device
        t = torch.tensor([ids], device=device)
        rec = PrefixKV(record_upto=len(ids))
        emb = get_module(self.model, self.arch.embed)(t)
        mask = torch.ones_like(t, dtype=torch.bool)
        pos = torch.arange(len(ids), device=device)[None]
        run_blocks(self.model, emb, pos, additive_mask(mask, 0, emb.dtype), rec, range(len(self.blocks)))
        return rec.recorded

    @staticmethod
    def _lent_kv(shared: dict, ctx: torch.Tensor, C: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per block, (B, heads, C, head_dim) keys/values: each row's context right-aligned, zeros elsewhere."""
        out = {}
        for c, kv in shared.items():
            rows = torch.nonzero(ctx == c)[:, 0]
            for layer, (k, v) in kv.items():
                if layer not in out:
                    shape = (len(ctx), k.shape[1], C, k.shape[3])
                    out[layer] = (k.new_zeros(shape), v.new_zeros(shape))
                out[layer][0][rows, :, C - k.shape[2] :] = k
                out[layer][1][rows, :, C - k.shape[2] :] = v
        return out

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (edits still optimising)."""
        self.batch = self.batch.select(rows)
        if self.fast:
            self._hL, self._mask = self._hL[rows.to(self._hL.device)], self._mask[rows]
            self.kv = {l: (k[rows.to(k.device)], v[rows.to(v.device)]) for l, (k, v) in self.kv.items()}

    def h_layer(self) -> torch.Tensor:
        """Layer output at the subject's last token for every row (B, d), on the batch's device."""
        return (self._hL[:, 0] if self.fast else self._hLsub).to(self.batch.ids.device)

    def run(self, delta_rows: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if not self.fast:
            return self._generic(b, delta_rows)[1]
        h = self._hL.clone()
        h[:, 0] = h[:, 0] + delta_rows.to(h.device)  # the fp32 delta, cast once to the hidden state's dtype
        qmask = additive_mask(self._mask, self._mask.shape[1] - h.shape[1], h.dtype)
        h = run_blocks(self.model, h, b.pos[:, self.P :], qmask, PrefixKV(self.kv),
                       range(self.layer + 1, len(self.blocks)))
        n_tok = int(b.mask[:, self.P :].sum())
        self.flops += 2 * 2 * n_tok * self._above_params
        return self._gather(get_module(self.model, self.arch.final_norm)(h), b)

    def _gather(self, h: torch.Tensor, b: Batch) -> torch.Tensor:
        """Hidden states at the loss positions, on the batch's device (the last block's may differ: device_map)."""
        h = h.to(b.tcol.device)
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(b.tcol)
        return h[rows, b.tcol]

    def _generic(self, b: Batch, delta_rows):
        """Any architecture: a full forward with a hook adding the delta at column P."""
        P = self.P

        def hook(_m, _args, out):
            h = output_tensor(out)
            self._hLsub = h[:, P].detach()
            if delta_rows is None:
                return out
            h = h.clone()
            h[:, P] = h[:, P] + delta_rows.to(h.device)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        with forward_hook(self.blocks[self.layer], hook):
            hs = self.model.base_model(input_ids=b.ids, attention_mask=b.mask.long(), position_ids=b.pos).last_hidden_state
        self.flops += 2 * (2 if delta_rows is not None else 1) * int(b.mask.sum()) * self._all_params
        return None, self._gather(hs[:, P:], b)
