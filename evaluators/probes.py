"""What edits cost and keep: held-out perplexity, known-fact accuracy, retention of applied edits.

- `perplexity`: exp of the mean next-token NLL over windows of the held-out corpus text;
- `known_fact_accuracy`: share of the shipped probe facts (CounterFact val facts the unedited
  model gets right) that greedy decoding still answers;
- `retention`: share of applied edit requests whose target is still the model's greedy answer;
- `fact_margins` / `damage`: the guard's measure with a noise floor. Per probe fact (the shipped
  `probe_facts.jsonl`: facts the unedited model answers, from CounterFact val, reserved CounterFact
  train records and zsRE) the answer's logit margin over the best other token; a batch's damage is the mean
  drop of that margin over the probe facts, with its paired standard error; `random_update` is the
  same-norm random update whose damage is the floor a real batch is compared with (agent/guard.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editors.arch import weight_view
from editors.corpus import heldout_text
from editors.delta import EditDelta, LayerDelta
from editors.prompts import EditRequest
from evaluators.scoring import DEFAULT_BATCH, answer_margins, greedy_matches, hidden_states, model_device, pad_id_of

KNOWN_FACTS_FILE = "known_facts.jsonl"
PROBE_FACTS_FILE = "probe_facts.jsonl"
CF_VAL, CF_TRAIN, ZSRE = "counterfact-val", "counterfact-train", "zsre-train-1k"  # ProbeFact.dataset values
MARGIN_BATCH = 128  # probe facts per forward in `fact_margins` (short prompts: the padding stays small)
LOGIT_ROWS = 2048  # positions sent through the LM head at once (bounds logits memory)


class KnownFact(BaseModel):
    prompt: str  # the prompt with the subject written in
    subject: str  # the entity the fact is about
    target: str  # the answer the unedited model gives (no leading space)
    case_id: int  # the CounterFact val record it comes from
    source: str = "prompt"  # which prompt of that record: "prompt", "rephrase" or "locality"


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """The probe set: the shipped file by default, else the JSONL file at `path`."""
    shipped = files("evaluators") / "data" / KNOWN_FACTS_FILE
    text = (Path(path) if path else shipped).read_text(encoding="utf-8")
    return [KnownFact.model_validate_json(line) for line in text.splitlines() if line.strip()]


class ProbeFact(BaseModel):
    prompt: str  # the prompt with the subject written in
    subject: str  # the entity the fact is about ("" for a question without one)
    target: str  # the answer the unedited model gives greedily (no leading space)
    dataset: str  # CF_VAL, CF_TRAIN (reserved records only, scripts/build_probes.py) or ZSRE
    record: int  # CounterFact case id, or the record's index in the zsRE file
    source: str  # which prompt of the record: prompt, rephrase, locality (CounterFact); src, rephrase (zsRE)
    margin: float  # the unedited model's margin (`fact_margins`) when the set was built, for reference


def load_probe_facts(path: str | Path | None = None) -> list[ProbeFact]:
    """The guard's probe set: the shipped `probe_facts.jsonl` by default, else the JSONL file at `path`."""
    shipped = files("evaluators") / "data" / PROBE_FACTS_FILE
    text = (Path(path) if path else shipped).read_text(encoding="utf-8")
    return [ProbeFact.model_validate_json(line) for line in text.splitlines() if line.strip()]


def reserved(dataset: str, facts: Sequence[ProbeFact] | None = None) -> set[int]:
    """Records of `dataset` that hold probe facts (CounterFact case ids, zsRE positions): no benchmark edits them.
    For "counterfact" the case ids of both CounterFact files (their ids are disjoint)."""
    facts = load_probe_facts() if facts is None else facts
    names = (CF_VAL, CF_TRAIN) if dataset == "counterfact" else (dataset,)
    return {f.record for f in facts if f.dataset in names}


def fact_margins(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact | ProbeFact],
                 batch_size: int = MARGIN_BATCH, progress: bool = False) -> torch.Tensor:
    """Per fact, float64 (n,): the mean over the answer's tokens (teacher-forced) of logit(answer token) -
    max logit(other token). Positive exactly where each token is the greedy choice on average; it moves
    continuously with any change of the model, so small damage shows long before an answer flips."""
    if not facts:
        return torch.zeros(0, dtype=torch.float64)
    margins, _ = answer_margins(model, tok, [f.prompt for f in facts], [f.target for f in facts],
                                batch_size=batch_size, progress=progress)
    return torch.stack([m.double().mean() for m in margins])


@dataclass(frozen=True)
class Damage:
    mean: float  # mean over probe facts of (margin before - margin after); > 0 = the facts lost margin
    se: float  # its standard error, from the per-fact paired differences
    n: int  # probe facts


def damage(before: torch.Tensor, after: torch.Tensor) -> Damage:
    """The damage of going from margins `before` to `after` (same facts, same order), paired per fact."""
    if before.shape != after.shape:
        raise ValueError(f"margins of {tuple(before.shape)} and {tuple(after.shape)} facts are not paired")
    d = (before.double() - after.double())
    n = d.numel()
    if n == 0:
        return Damage(0.0, 0.0, 0)
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    return Damage(float(d.mean()), se, n)


def layer_norms_of(delta: EditDelta) -> dict[int, float]:
    """||U V^T||_F of every layer of `delta`, without forming the product."""
    out = {}
    for d in delta.layers:
        u, v = d.u.double(), d.v.double()
        out[d.layer] = float(torch.sqrt(((u.T @ u) * (v.T @ v)).sum().clamp_min(0)))
    return out


def random_update(model: nn.Module, norms: dict[int, float], generator: torch.Generator,
                  rank: int = 0) -> EditDelta:
    """A random update with Frobenius norm `norms[l]` in each layer l: Gaussian U V^T of `rank` (0 = dense:
    U is the identity's share of a full-rank Gaussian, stored as U = G, V = I). Its direction ignores what the
    model stores, so its damage is what an update of that size costs by its size alone."""
    out = []
    for layer, norm in sorted(norms.items()):
        o, i = weight_view(model, layer).shape
        if rank:
            u = torch.randn(o, rank, generator=generator, dtype=torch.float64)
            v = torch.randn(i, rank, generator=generator, dtype=torch.float64)
            scale = norm / float(torch.sqrt(((u.T @ u) * (v.T @ v)).sum()))
        else:
            u = torch.randn(o, i, generator=generator, dtype=torch.float64)
            v = torch.eye(i, dtype=torch.float64)
            scale = norm / float(u.norm())
        out.append(LayerDelta(layer, (u * scale).float(), v.float()))
    return EditDelta(out)


def known_fact_hits(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact],
                    batch_size: int = DEFAULT_BATCH, progress: bool = False) -> torch.Tensor:
    """Per fact: does greedy decoding still start with " " + target? Bool tensor (n,)."""
    return greedy_matches(model, tok, [f.prompt for f in facts], [f.target for f in facts],
                          batch_size=batch_size, progress=progress)


def known_fact_accuracy(model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact] | None = None,
                        batch_size: int = DEFAULT_BATCH, progress: bool = False) -> float:
    """Share of known facts still answered (the shipped probe set when `facts` is None)."""
    facts = load_known_facts() if facts is None else facts
    return float(known_fact_hits(model, tok, facts, batch_size, progress).float().mean()) if facts else 0.0


def retention(model: nn.Module, tok: PreTrainedTokenizerBase, applied_requests: Sequence[EditRequest],
              whole_answer: bool = False, batch_size: int = DEFAULT_BATCH, progress: bool = False) -> float:
    """Share of applied edits whose target is the greedy answer on the edit prompt.

    By default only the first target token must be the greedy next token; with `whole_answer`
    every target token must be (greedy decoding reproduces the whole target).
    """
    if not applied_requests:
        return 0.0
    hits = greedy_matches(model, tok, [r.text() for r in applied_requests], [r.target for r in applied_requests],
                          first_token_only=not whole_answer, batch_size=batch_size, progress=progress)
    return float(hits.float().mean())


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
