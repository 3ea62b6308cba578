"""Running decoder blocks directly on hidden states, with fixed prefix keys/values: shared by keys and values.

Rotary decoders (ArchSpec.rotary set) can be run block by block: a row's prefix is computed once and
lent to later runs as keys/values (`PrefixKV`, a duck-typed cache that never grows), queries see
them through an explicit additive mask (`additive_mask`), and `run_blocks` is the one loop that
moves hidden states through a range of blocks. The layer-wise key stream (keys.py) and the value
optimisation's suffix runner (values.py) both run on it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from editors.arch import arch_of, get_module, layers_of


class PrefixKV:
    """Duck-typed KV cache: prepends each layer's fixed prefix keys/values and never grows;
    with `record_upto`, also keeps the first `record_upto` columns of the result (`recorded`)."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, record_upto: int = 0):
        self.kv = kv if kv is not None else {}
        self.record_upto = record_upto
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        if layer_idx in self.kv:
            pk, pv = self.kv[layer_idx]
            k, v = torch.cat([pk.to(k.device), k], 2), torch.cat([pv.to(v.device), v], 2)
        if self.record_upto:
            self.recorded[layer_idx] = (k[:, :, : self.record_upto].detach(), v[:, :, : self.record_upto].detach())
        return k, v


def additive_mask(mask: torch.Tensor, q_from: int, dtype) -> torch.Tensor:
    """(B, 1, Q, K) additive causal+padding mask for queries at columns q_from.. of `mask`."""
    K = mask.shape[1]
    q = torch.arange(q_from, K, device=mask.device)[:, None]
    k = torch.arange(K, device=mask.device)[None, :]
    allowed = (k <= q)[None] & mask[:, None, :]
    allowed |= (k == q)[None]  # a padded query still attends to itself: no NaN rows
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def output_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def run_blocks(model: nn.Module, h: torch.Tensor, pos: torch.Tensor, mask4: torch.Tensor, cache: PrefixKV,
               blocks: Iterable[int]) -> torch.Tensor:
    """Hidden states `h` (B, Q, d) at positions `pos` through decoder `blocks` in order, each block attending to
    its keys/values in `cache` (prepended to the queries' own) under the additive mask `mask4` (B, 1, Q, K)."""
    layers = layers_of(model)
    rope = get_module(model, arch_of(model).rotary)(h, pos)
    for i in blocks:  # `cache` is the decoder layers' KV-cache argument from transformers 5.24 (pinned in pyproject)
        h = output_tensor(layers[i](h, attention_mask=mask4, position_ids=pos, cache=cache,
                                    use_cache=True, position_embeddings=rope))
    return h
