"""Covariance statistics C0 = E[k k^T] of each edited module's input over a text corpus.

Uncentred second moments, accumulated in float64 from float32 chunk products, forward
only up to the deepest edited layer, on the model's device, over the shipped WikiText-2 part or a user's
corpus (editors/user_corpus.py). Cached per (model fingerprint, layer, corpus hash, token count) under the
kagent cache dir; `kagent stats` computes and shows them. What is derived
from C0 (AlphaEdit's null-space projection, the superposition whitener) is computed once per loaded
statistics object (`LayerStats.cached`), on the device the statistics were placed on.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import ExitStack
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from editors.arch import get_module, module_name
from editors.corpus import stats_text
from editors.devices import input_device
from editors.hooks import StopForward, forward_pre_hook
from editors.models import cache_dir, fingerprint
from editors.user_corpus import UserCorpus

log = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class LayerStats:
    layer: int
    mom2: torch.Tensor  # (d_in, d_in) float64, E[k k^T]
    count: int  # tokens averaged
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # name -> tensor computed from mom2

    def to(self, device) -> "LayerStats":
        """The same statistics on `device` (where the layer's solves run); derived tensors are computed anew there."""
        return LayerStats(self.layer, self.mom2.to(device), self.count)

    def cached(self, name, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """compute(mom2), computed once per statistics object (a whitener, a null-space projection) and kept."""
        if name not in self.derived:
            self.derived[name] = compute(self.mom2)
        return self.derived[name]


def _stats_path(fp: str, layer: int, corpus: str, n_tokens: int) -> Path:
    return cache_dir() / "stats" / f"{fp}-L{layer}-{corpus}-{n_tokens}.safetensors"


def _token_chunks(tok, text: "str | UserCorpus", n_tokens: int, seq_len: int) -> torch.Tensor:
    if isinstance(text, UserCorpus):
        ids = text.token_ids(tok, n_tokens)
    else:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:n_tokens]
    n_seq = max(1, len(ids) // seq_len)
    return ids[: n_seq * seq_len].view(n_seq, seq_len) if len(ids) >= seq_len else ids.view(1, -1)


@torch.no_grad()
def _accumulate(model: nn.Module, seqs: torch.Tensor, layers: list[int], batch: int) -> dict[int, torch.Tensor]:
    device = input_device(model)
    sums = {l: None for l in layers}

    def capture(layer):
        def hook(_m, args):
            k = args[0].reshape(-1, args[0].shape[-1]).float()
            prod = (k.T @ k).double()
            sums[layer] = prod if sums[layer] is None else sums[layer] + prod
            if layer == max(layers):
                raise StopForward
        return hook

    with ExitStack() as stack:
        for l in layers:
            stack.enter_context(forward_pre_hook(get_module(model, module_name(model, l)), capture(l)))
        for i in tqdm(range(0, len(seqs), batch), desc="covariance stats", unit="batch"):
            try:
                model(seqs[i : i + batch].to(device))
            except StopForward:
                pass
    return sums


def layer_stats(model: nn.Module, tok, layers: list[int], text: "str | UserCorpus", n_tokens: int = 100_000,
                seq_len: int = 256, batch: int = 8) -> dict[int, LayerStats]:
    """E[k k^T] for each layer in `layers` over `text` (a string, or a user corpus read as a stream), computed once
    and cached on disk by the model fingerprint and the corpus's content hash."""
    fp = fingerprint(model)
    corpus = text.digest() if isinstance(text, UserCorpus) else text_hash(text)
    out: dict[int, LayerStats] = {}
    missing = []
    for l in layers:
        path = _stats_path(fp, l, corpus, n_tokens)
        if path.exists():
            t = load_file(str(path))
            out[l] = LayerStats(l, t["mom2"], int(t["count"].item()))
        else:
            missing.append(l)
    if missing:
        seqs = _token_chunks(tok, text, n_tokens, seq_len)
        count = seqs.numel()
        log.info("computing covariance of layers %s over %d tokens", missing, count)
        sums = _accumulate(model, seqs, missing, batch)
        for l in missing:
            mom2 = (sums[l] / count).cpu()
            path = _stats_path(fp, l, corpus, n_tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"mom2": mom2, "count": torch.tensor(count)}, str(tmp))
            tmp.rename(path)
            out[l] = LayerStats(l, mom2, count)
    return out


def default_corpus() -> str:
    """The shipped statistics corpus (part of WikiText-2; see editors/data/ATTRIBUTION.md)."""
    return stats_text()
