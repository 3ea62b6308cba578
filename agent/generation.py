"""Generation on the served model: prompt ids (the model's own chat template, or the prompt text), `model.generate`
with its KV cache (greedy at temperature 0, sampled above) over a batch of requests (left-padded; each row ends on its
own stop strings, end of sequence or max_tokens), and each row's text handed out piece by piece.

The entity memory matches subjects in the prompt's prefill (editors/entity_memory.py), so generating with the cache
answers with the edits like `kagent ask` does. Text is decoded from all ids so far and handed out only up to what
cannot change any more: an unfinished UTF-8 character and a tail that may still grow into a stop string are held
back, so a stop string never reaches the client, as OpenAI's API promises.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from editors.devices import input_device

REPLACEMENT = "\ufffd"  # what decode shows for an incomplete UTF-8 sequence


class NoChatTemplate(ValueError):
    """The model's tokenizer has no chat template (only /v1/completions can be served)."""


@dataclass(frozen=True)
class Sampling:
    """How to generate: the request's parameters, checked."""

    max_tokens: int  # new tokens at most
    temperature: float = 0.0  # 0: greedy (reproducible); > 0: sampled at this temperature
    top_p: float = 1.0  # nucleus mass when sampling
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: int | None = None  # seeds the sampler (with temperature > 0)


@dataclass(frozen=True)
class Outcome:
    text: str  # the whole completion, stop string excluded
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


def chat_ids(tok, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ending with the assistant's turn opened."""
    if not getattr(tok, "chat_template", None):
        raise NoChatTemplate("this model has no chat template; use /v1/completions")
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tok, prompt: str) -> list[int]:
    """Token ids of a completion prompt, tokenised as `kagent ask` does (the tokenizer's special tokens added)."""
    return list(tok(prompt)["input_ids"])


def eos_ids(model, tok) -> set[int]:
    """Every token id that ends a turn: the generation config's and the tokenizer's end of sequence."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


class TextAssembler:
    """Token ids in, text out: each `add` returns the text that can be shown now; `stopped` once a stop string came."""

    def __init__(self, tok, stop: Sequence[str]):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the completion so far, cut before a stop string
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[:min(cuts)], True
            return self._upto(len(self.text))
        self.text = text
        return self._upto(len(text) - self._held(text))

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may still change: a partial character or a stop string's start."""
        held = len(text) - text.rfind(REPLACEMENT) if text.endswith(REPLACEMENT) else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def _upto(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text, at the end of generation."""
        return self._upto(len(self.text))


class Preempted(Exception):
    """`generate_batch` was cancelled before every row ended (nothing it generated is to be used)."""


class _Halt(StoppingCriteria):
    """Ends each row once its event is set (a stop string or its max_tokens came, or its client went away), and
    every row once `cancel` is set."""

    def __init__(self, events: Sequence[threading.Event], cancel: threading.Event | None = None):
        self.events, self.cancel = events, cancel

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(len(self.events), dtype=torch.bool, device=input_ids.device)
        return torch.tensor([e.is_set() for e in self.events], dtype=torch.bool, device=input_ids.device)


class _Tokens(BaseStreamer):
    """Hands every new token id of row b to `on_token[b]` (generate first puts the prompts, which are skipped)."""

    def __init__(self, on_token: Sequence[Callable[[int], None]]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, t in zip(self.on_token, value.reshape(-1).tolist()):
            row(int(t))

    def end(self) -> None:
        pass


def generation_config(model, tok, sampling: Sampling, eos: set[int]) -> GenerationConfig:
    sample = sampling.temperature > 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos) if eos else 0
    return GenerationConfig(max_new_tokens=sampling.max_tokens, do_sample=sample, use_cache=True,
                            temperature=sampling.temperature if sample else None,
                            top_p=sampling.top_p if sample else None, top_k=0 if sample else None,
                            eos_token_id=sorted(eos) or None, pad_token_id=pad)


@dataclass
class Row:
    """One request in a batched generation: its prompt ids, sampling, where its text goes and what halts it."""

    ids: list[int]  # prompt token ids
    sampling: Sampling  # its own max_tokens and stop strings; temperature and top_p as the batch's
    on_text: Callable[[str], None]  # each new piece of its text
    halt: threading.Event = field(default_factory=threading.Event)  # set from outside: ends this row early


class _RowState:
    """One row's tokens as they come: text, end of sequence, its own max_tokens."""

    def __init__(self, row: Row, tok, eos: set[int]):
        self.row, self.eos_ids, self.text = row, eos, TextAssembler(tok, row.sampling.stop)
        self.tokens, self.eos = 0, False

    def on_token(self, t: int) -> None:
        if self.text.stopped or self.eos or self.tokens >= self.row.sampling.max_tokens:
            return
        if t in self.eos_ids:
            self.eos = True
            self.row.halt.set()
            return
        self.tokens += 1
        if piece := self.text.add(t):
            self.row.on_text(piece)
        if self.text.stopped or self.tokens >= self.row.sampling.max_tokens:
            self.row.halt.set()

    def outcome(self) -> Outcome:
        if rest := self.text.finish():
            self.row.on_text(rest)
        done = self.text.stopped or self.eos or self.tokens < self.row.sampling.max_tokens
        return Outcome(self.text.text, "stop" if done else "length", len(self.row.ids), self.tokens)


def compatible(a: Sampling, b: Sampling) -> bool:
    """Whether two requests can share one batched generation: the same sampler, and no seed (a seeded request
    runs alone, so that its seed decides its tokens)."""
    if a.temperature == b.temperature == 0:
        return True  # greedy: the seed plays no part
    return a.seed is None and b.seed is None and (a.temperature, a.top_p) == (b.temperature, b.top_p)


@torch.no_grad()
def generate_batch(model, tok, rows: Sequence[Row], cancel: threading.Event | None = None) -> list[Outcome]:
    """Generate after each row's prompt in one batch (prompts left-padded, the KV cache shared), handing each row's
    new text to its `on_text`; rows end on their own (stop string, end of sequence, max_tokens, halt). `cancel` set
    from outside ends the generation at the next step: `Preempted` when a row had not ended by then."""
    eos = eos_ids(model, tok)
    states = [_RowState(r, tok, eos) for r in rows]
    first = rows[0].sampling
    if first.seed is not None and first.temperature > 0:
        torch.manual_seed(first.seed)
    config = generation_config(model, tok, replace(first, max_tokens=max(r.sampling.max_tokens for r in rows)), eos)
    width = max(len(r.ids) for r in rows)
    x = torch.tensor([[config.pad_token_id] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], dtype=torch.long)
    dev = input_device(model)
    model.generate(input_ids=x.to(dev), attention_mask=mask.to(dev), streamer=_Tokens([s.on_token for s in states]),
                   generation_config=config,
                   stopping_criteria=StoppingCriteriaList([_Halt([r.halt for r in rows], cancel)]))
    if cancel is not None and cancel.is_set() and not all(r.halt.is_set() for r in rows):
        raise Preempted
    return [s.outcome() for s in states]


def generate(model, tok, ids: list[int], sampling: Sampling, on_text: Callable[[str], None],
             halt: threading.Event | None = None) -> Outcome:
    """Generate after `ids`, handing each new piece of text to `on_text`; `halt` set from outside ends it early."""
    return generate_batch(model, tok, [Row(ids, sampling, on_text, halt or threading.Event())])[0]
