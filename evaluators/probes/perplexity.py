"""Held-out perplexity: exp of the mean next-token NLL over strided windows of a text (default: the held-out
corpus, editors/corpus.py), each token after the first scored once, the LM head applied only at scored positions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editors.corpus import heldout_text
from evaluators.scoring import hidden_states, model_device, pad_id_of

LOGIT_ROWS = 2048  # positions sent through the LM head at once (bounds logits memory)


class Window(BaseModel):
    begin: int  # index of the window's first token in the token stream
    end: int  # one past its last token
    first_scored: int  # first token index (in the stream) whose NLL this window contributes


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Strided windows covering the stream; each token from index 1 on is scored exactly once.

    A window scores the tokens the previous one did not reach, so with stride < window every
    window after the first gives its scored tokens (window - stride) tokens of context.
    """
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride} window={window}")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        out.append(Window(begin=begin, end=end, first_scored=max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def _window_nll_sum(model: nn.Module, stream: torch.Tensor, batch: Sequence[Window], pad_id: int) -> tuple[float, int]:
    """Summed NLL and count of the tokens scored by a batch of windows (one forward)."""
    device = model_device(model)
    width = max(w.end - w.begin for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, labels = [], [], []
    for i, w in enumerate(batch):
        ids[i, : w.end - w.begin] = stream[w.begin: w.end]
        mask[i, : w.end - w.begin] = 1
        positions = range(w.first_scored - w.begin - 1, w.end - w.begin - 1)  # positions predicting scored tokens
        rows += [i] * len(positions)
        cols += positions
        labels.append(stream[w.first_scored: w.end])
    hidden = hidden_states(model, ids.to(device), mask.to(device))
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    gold = torch.cat(labels).to(device)
    head = model.get_output_embeddings()
    total = sum(float(torch.nn.functional.cross_entropy(head(picked[i: i + LOGIT_ROWS]).float(),
                                                        gold[i: i + LOGIT_ROWS], reduction="sum"))
                for i in range(0, len(gold), LOGIT_ROWS))
    return total, len(gold)


def perplexity(model: nn.Module, tok: PreTrainedTokenizerBase, text: str | None = None, max_tokens: int = 8192,
               window: int = 1024, stride: int | None = None, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over the first `max_tokens` tokens of `text` (default: the held-out corpus).

    The token stream is cut into windows of `window` tokens every `stride` tokens (default
    window - 1: consecutive windows share one token, so each window's first scored token has
    context); windows run `batch_size` at a time and every token after the first is scored once.
    """
    if text is None:
        text = heldout_text()
    stream = torch.tensor(tok(text, add_special_tokens=False).input_ids[:max_tokens], dtype=torch.long)
    if len(stream) < 2:
        raise ValueError("perplexity needs at least two tokens of text")
    spans = windows(len(stream), window, stride or max(window - 1, 1))
    total, count = 0.0, 0
    pad_id = pad_id_of(tok)
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress, leave=False):
        nll, n = _window_nll_sum(model, stream, spans[i: i + batch_size], pad_id)
        total, count = total + nll, count + n
    return math.exp(total / count)
