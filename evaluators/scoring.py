"""Batched, gradient-free scoring of answers after prompts: the primitive under every metric.

A scored pair is `prompt` followed by `" " + answer` (the answer tokenised on its own, so its
tokens are the same whatever the prompt). Pairs are sorted by length, right-padded and run in
chunks of one forward each; the LM head is applied only at the positions that predict answer
tokens, never to the whole sequence (the vocabulary projection dominates small models).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editors.devices import input_device
from editors.entity_memory import prompts_end_at

DEFAULT_BATCH = 64  # pairs per forward pass


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]  # tokens of the prompt (with the tokenizer's special tokens, if any)
    answer_ids: list[int]  # tokens of " " + answer, no special tokens

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def encode_pairs(tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]) -> list[Pair]:
    """Tokenise prompts and " " + answers separately (answers without special tokens)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    p_ids = tok(list(prompts)).input_ids if prompts else []
    a_ids = tok([" " + a for a in answers], add_special_tokens=False).input_ids if answers else []
    pairs = [Pair(list(p), list(a)) for p, a in zip(p_ids, a_ids)]
    for pair, answer in zip(pairs, answers):
        if not pair.prompt_ids or not pair.answer_ids:
            raise ValueError(f"empty prompt or answer tokens for answer {answer!r}")
    return pairs


def model_device(model: nn.Module) -> torch.device:
    """Where input ids go (the embedding's device; the first block's under a device map)."""
    return input_device(model)


def _pad(seqs: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok: PreTrainedTokenizerBase) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad) if pad is not None else 0


@torch.no_grad()
def hidden_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) of a right-padded batch, without the LM head."""
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


@torch.no_grad()
def logits_at(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) only at the selected (row, position) pairs."""
    return model.get_output_embeddings()(hidden[rows, cols]).float()


def _answer_positions(pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(rows, positions predicting answer tokens, answer token ids, answer length per pair)."""
    rows, cols, labels, lengths = [], [], [], []
    for i, pair in enumerate(pairs):
        start = len(pair.prompt_ids) - 1
        n = len(pair.answer_ids)
        rows += [i] * n
        cols += range(start, start + n)
        labels += pair.answer_ids
        lengths.append(n)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(labels), lengths


def _chunks(n_items: int, order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i: i + batch_size] for i in range(0, n_items, batch_size)]


@torch.no_grad()
def _score_chunk(model: nn.Module, pairs: Sequence[Pair], pad_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair: NLL of each answer token and the argmax token at each answer position."""
    device = model_device(model)
    ids, mask = _pad([p.ids for p in pairs], pad_id, device)
    rows, cols, labels, lengths = _answer_positions(pairs)
    with prompts_end_at([len(p.prompt_ids) for p in pairs]):  # an answer naming a subject fires no slot
        logits = logits_at(model, hidden_states(model, ids, mask), rows.to(device), cols.to(device))
    nll = torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="none").cpu()
    top = logits.argmax(-1).cpu()
    return list(nll.split(lengths)), list(top.split(lengths))


def _per_pair(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
              chunk_fn, batch_size: int, progress: bool, desc: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run `chunk_fn(model, pairs, pad_id) -> (firsts, seconds)` over length-sorted chunks of the encoded pairs and
    return both per-pair lists in the input order."""
    pairs = encode_pairs(tok, prompts, answers)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].ids))
    firsts: list[torch.Tensor | None] = [None] * len(pairs)
    seconds: list[torch.Tensor | None] = [None] * len(pairs)
    pad_id = pad_id_of(tok)
    for chunk in tqdm(_chunks(len(pairs), order, batch_size), desc=desc, disable=not progress, leave=False):
        chunk_a, chunk_b = chunk_fn(model, [pairs[i] for i in chunk], pad_id)
        for i, a, b in zip(chunk, chunk_a, chunk_b):
            firsts[i], seconds[i] = a, b
    return firsts, seconds  # type: ignore[return-value]


@torch.no_grad()
def score_pairs(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
                batch_size: int = DEFAULT_BATCH, progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each (prompt, answer): per-token NLL of " " + answer and the argmax token at each answer position."""
    return _per_pair(model, tok, prompts, answers, _score_chunk, batch_size, progress, "scoring")


@torch.no_grad()
def _margin_chunk(model: nn.Module, pairs: Sequence[Pair], pad_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, at each answer position: logit(answer token) - max logit of any other token, and log P(token)."""
    device = model_device(model)
    ids, mask = _pad([p.ids for p in pairs], pad_id, device)
    rows, cols, labels, lengths = _answer_positions(pairs)
    with prompts_end_at([len(p.prompt_ids) for p in pairs]):  # an answer naming a subject fires no slot
        logits = logits_at(model, hidden_states(model, ids, mask), rows.to(device), cols.to(device))
    labels = labels.to(device)
    gold = logits.gather(1, labels[:, None])[:, 0]
    top2 = logits.topk(2, dim=-1)
    other = torch.where(top2.indices[:, 0] == labels, top2.values[:, 1], top2.values[:, 0])
    logp = gold - logits.logsumexp(-1)
    return list((gold - other).cpu().split(lengths)), list(logp.cpu().split(lengths))


@torch.no_grad()
def answer_margins(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = DEFAULT_BATCH,
                   progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each (prompt, answer), teacher-forced at every token of " " + answer: the logit margin of the answer
    token over the best other token (> 0 exactly where it is the greedy choice; it equals the log-probability
    margin, the softmax's normaliser cancels) and the answer token's log-probability. One tensor per pair each."""
    return _per_pair(model, tok, prompts, answers, _margin_chunk, batch_size, progress, "margins")


def target_nll(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str],
               batch_size: int = DEFAULT_BATCH, progress: bool = False) -> torch.Tensor:
    """Mean per-token NLL of " " + target after each prompt, shape (n,)."""
    nlls, _ = score_pairs(model, tok, prompts, targets, batch_size, progress)
    return torch.stack([n.mean() for n in nlls]) if nlls else torch.zeros(0)


def teacher_forced_argmax(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                          answers: Sequence[str], batch_size: int = DEFAULT_BATCH,
                          progress: bool = False) -> list[torch.Tensor]:
    """Argmax prediction at each answer position with the true answer prefix fed in (one tensor per pair)."""
    return score_pairs(model, tok, prompts, answers, batch_size, progress)[1]


def answer_token_ids(tok: PreTrainedTokenizerBase, answers: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of " " + answer, as the scorer sees them."""
    ids = tok([" " + a for a in answers], add_special_tokens=False).input_ids if answers else []
    return [torch.tensor(i, dtype=torch.long) for i in ids]


def top1_tokens_correct(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                        answers: Sequence[str], batch_size: int = DEFAULT_BATCH,
                        progress: bool = False) -> torch.Tensor:
    """Per pair: fraction of answer tokens that are the teacher-forced argmax (zsRE token accuracy), shape (n,)."""
    tops = teacher_forced_argmax(model, tok, prompts, answers, batch_size, progress)
    gold = answer_token_ids(tok, answers)
    return torch.tensor([(t == g).float().mean().item() for t, g in zip(tops, gold)])


def greedy_matches(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
                   first_token_only: bool = False, batch_size: int = DEFAULT_BATCH,
                   progress: bool = False) -> torch.Tensor:
    """Per pair: does greedy decoding after the prompt start with " " + answer? Bool tensor (n,).

    Greedy decoding reproduces the answer exactly when every answer token is the argmax given the
    answer prefix, so this is one teacher-forced forward rather than a decoding loop.
    With `first_token_only`, only the first answer token must be the greedy next token.
    """
    tops = teacher_forced_argmax(model, tok, prompts, answers, batch_size, progress)
    gold = answer_token_ids(tok, answers)
    if first_token_only:
        return torch.tensor([bool(t[0] == g[0]) for t, g in zip(tops, gold)], dtype=torch.bool)
    return torch.tensor([bool(torch.equal(t, g)) for t, g in zip(tops, gold)], dtype=torch.bool)


@torch.no_grad()
def greedy_next_tokens(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], n_tokens: int = 1,
                       batch_size: int = DEFAULT_BATCH) -> list[list[int]]:
    """Greedy continuation (token ids, `n_tokens` each) of every prompt, batched with right padding."""
    seqs = [list(ids) for ids in tok(list(prompts)).input_ids] if prompts else []
    out: list[list[int]] = [[] for _ in seqs]
    device = model_device(model)
    pad_id = pad_id_of(tok)
    for start in range(0, len(seqs), batch_size):
        idx = list(range(start, min(start + batch_size, len(seqs))))
        for _ in range(n_tokens):
            ids, mask = _pad([seqs[i] + out[i] for i in idx], pad_id, device)
            last = mask.sum(1) - 1
            rows = torch.arange(len(idx), device=device)
            with prompts_end_at([len(seqs[i]) for i in idx]):  # generated text fires no slot, as with a KV cache
                nxt = logits_at(model, hidden_states(model, ids, mask), rows, last).argmax(-1).tolist()
            for i, t in zip(idx, nxt):
                out[i].append(int(t))
    return out


def greedy_answers(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], n_tokens: int = 8,
                   batch_size: int = DEFAULT_BATCH) -> list[str]:
    """Greedy decoded continuations as text (for showing what the model now says)."""
    return [tok.decode(t, skip_special_tokens=True) for t in greedy_next_tokens(model, tok, prompts, n_tokens, batch_size)]
