"""Entity memory: per edited subject, one residual vector added to a layer's output at the subject's last token.

The weights of a small model cannot hold many edits without damage (BENCHMARKS.md, "frontier"): every
closed-form update to an MLP also moves the outputs of keys it was not meant for. The entity memory writes
an edit where it was optimised instead: the target-value optimisation finds a vector `delta` that, added to
layer L's output at the subject's last token, makes the model answer the target; the memory adds exactly
that vector at exactly that place, whenever the subject's tokens occur in the input, and nothing anywhere
else. Prompts about other subjects see the unedited model bit for bit.

A slot is keyed by the subject text and matched on token ids: the subject, its aliases and their other casings
(lower case, each word capitalised, upper case), each tokenised with and without a leading space (the two forms
a BPE tokenizer gives a word after a space and at the start of a text or after punctuation; a possessive "X's"
keeps X's tokens). Where several subjects match at one position the longest wins. Matching needs the input ids,
which a pre-hook on the model's decoder stack records; only the prompt is matched, never what the model
generates: a forward call that continues a KV cache (a decoding step) matches nothing, and a call that scores a
prompt with its answer in one pass (teacher forcing, evaluators/scoring.py) says where each prompt ends with
`prompts_end_at`. So `generate` with a KV cache, greedy decoding without one and teacher-forced scoring agree.

Hooks are installed only by `attached()`, a context manager that always removes them; `suspended()`
turns the memory off inside it (the value optimisation runs on the model without the memory).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
import contextlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from editors.arch import layers_of
from editors.forward import output_tensor


@dataclass
class MemoryWrite:
    """The slots one batch writes: `deltas[i]` becomes the slot of `subjects[i]` at `layer`'s output."""

    layer: int  # decoder block whose output the deltas are added to
    subjects: list[str]  # subject texts, one per row of `deltas`
    deltas: torch.Tensor  # (k, d) float32
    aliases: dict[str, list[str]] = field(default_factory=dict)  # subject -> other names that fire its slot
    keys: torch.Tensor | None = None  # (k, m, d) unit keys of answer-site slots, m per slot (None: subject-site slots)
    radii: torch.Tensor | None = None  # (k, m) least cosine to a key at which its slot fires (NaN: no such key)
    answers: dict[str, list[int]] = field(default_factory=dict)  # answer-site subject -> tokens the unedited model
    #   answers its edited prompts with: the slot also fires where the model without the memory would say one of them

    def __post_init__(self) -> None:
        if len(self.subjects) != self.deltas.shape[0]:
            raise ValueError(f"{len(self.subjects)} subjects but {self.deltas.shape[0]} memory deltas")
        if (self.keys is None) != (self.radii is None):
            raise ValueError("answer-site memory slots need both keys and radii")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The write as named tensors (subjects and aliases as UTF-8 JSON bytes), for safetensors files."""
        out = {"memory.layer": torch.tensor([self.layer], dtype=torch.int64),
               "memory.subjects": _json_bytes(self.subjects),
               "memory.deltas": self.deltas.detach().float().cpu().contiguous()}
        if self.aliases:
            out["memory.aliases"] = _json_bytes(self.aliases)
        if self.answers:
            out["memory.answers"] = _json_bytes(self.answers)
        if self.keys is not None:
            out["memory.keys"] = self.keys.detach().float().cpu().contiguous()
            out["memory.radii"] = self.radii.detach().float().cpu().contiguous()
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "MemoryWrite | None":
        """The write stored by `tensors()` (None when the tensors hold none)."""
        if "memory.deltas" not in tensors:
            return None
        subjects = json.loads(bytes(tensors["memory.subjects"].tolist()).decode())
        aliases, answers = (json.loads(bytes(tensors[f"memory.{name}"].tolist()).decode())
                            if f"memory.{name}" in tensors else {} for name in ("aliases", "answers"))
        return MemoryWrite(int(tensors["memory.layer"][0]), subjects, tensors["memory.deltas"], aliases,
                           tensors.get("memory.keys"), tensors.get("memory.radii"), answers)


class _Reached(Exception):
    """Raised by `last_states`' hook once the block it reads has run: the blocks above it are not needed."""


@torch.no_grad()
def last_states(model: nn.Module, tok, texts: Sequence[str], layer: int, batch_size: int = 32) -> torch.Tensor:
    """(n, d) unit vectors: block `layer`'s output at each text's last token (the model as it is; the forward pass
    stops at that block)."""
    out, grabbed = [], {}

    def grab(_m, _a, o):
        grabbed["h"] = output_tensor(o)
        raise _Reached

    hook = layers_of(model)[layer].register_forward_hook(grab)
    every = tok(list(texts)).input_ids if texts else []
    order = sorted(range(len(every)), key=lambda i: len(every[i]))  # similar lengths together: little padding
    try:
        for start in range(0, len(order), batch_size):
            ids = [every[i] for i in order[start: start + batch_size]]
            width = max(len(i) for i in ids)
            x = torch.tensor([i + [0] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            device = model.get_input_embeddings().weight.device
            try:
                model.base_model(input_ids=x.to(device), attention_mask=mask.to(device))
            except _Reached:
                pass
            last = torch.tensor([len(i) - 1 for i in ids])
            out.append(grabbed["h"][torch.arange(len(ids)), last.to(grabbed["h"].device)].float().cpu())
    finally:
        hook.remove()
    if not out:
        return torch.zeros(0)
    states = torch.empty(len(texts), out[0].shape[1])
    states[torch.tensor(order)] = torch.cat(out)
    return torch.nn.functional.normalize(states, dim=1)


_FUNCTION_WORDS = frozenset("""the and not one two his her its their this that these those also which who whom whose
from with for was were has had have are been being about known called named used part some many most more very only
now then there here what when where how into onto over under after before while than like such""".split())


@torch.no_grad()
def recall_tokens(model: nn.Module, tok, texts: Sequence[str], batch_size: int = 32) -> list[int | None]:
    """The model's greedy next token after each text, where it names something (a word of 3+ letters that is not a
    function word: " Paris", " French", " physician"), else None: what an answer-site slot recalls (`answers`)."""
    out: list[int | None] = []
    every = tok(list(texts)).input_ids if texts else []
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(every), batch_size):
        ids = every[start: start + batch_size]
        width = max(len(i) for i in ids)
        x = torch.tensor([i + [0] * (width - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
        h = _final_hidden(model.base_model(input_ids=x, attention_mask=mask))
        last = torch.tensor([len(i) - 1 for i in ids], device=device)
        top = model.get_output_embeddings()(h[torch.arange(len(ids), device=device), last]).argmax(-1).tolist()
        out += [t if _names_something(tok.decode([t])) else None for t in top]
    return out


def _final_hidden(out) -> torch.Tensor:
    """The decoder stack's normed last hidden states, from its output object or tuple."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else output_tensor(out)


def _names_something(piece: str) -> bool:
    word = piece.strip()
    return len(word) >= 3 and word.isalpha() and word.lower() not in _FUNCTION_WORDS


def keys_and_radii(positive: torch.Tensor, negative: torch.Tensor, margin: float,
                   discriminant: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An answer-site slot's keys (one per prompt that must fire it: the edit's forms) and radii: each key's
    nearest prompt that must not fire it (the subject's other relations and descriptions), plus `margin` of the
    way from there to the key itself. With `discriminant` (a share), one more key: the direction from the mean of
    the prompts that must not fire to the mean of those that must (what tells the edited relation from the
    subject's others), its radius `discriminant` of the way from the highest negative to the mean positive along it."""
    if len(negative) == 0:
        return positive, torch.full((len(positive),), 0.5)
    hardest = (positive @ negative.T).max(1).values
    keys, radii = positive, hardest + margin * (1 - hardest)
    if discriminant is not None:
        w = torch.nn.functional.normalize(positive.mean(0) - negative.mean(0), dim=0)
        lo, mean = float((negative @ w).max()), float((positive @ w).mean())
        if mean > lo:
            keys = torch.cat([keys, w[None]])
            radii = torch.cat([radii, torch.tensor([lo + discriminant * (mean - lo)], dtype=radii.dtype)])
    return keys, radii


def _json_bytes(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


_PROMPT_ENDS: ContextVar[list[int] | None] = ContextVar("kagent_prompt_ends", default=None)


@contextmanager
def prompts_end_at(ends: Sequence[int]) -> Iterator[None]:
    """For forward calls in the block that hold each prompt followed by its answer (row b's prompt: the first
    `ends[b]` tokens), subjects are matched in the prompts only, as `generate` would."""
    token = _PROMPT_ENDS.set(list(ends))
    try:
        yield
    finally:
        _PROMPT_ENDS.reset(token)


def casings(name: str) -> list[str]:
    """`name` as written, in lower case, with each word capitalised, and in upper case (distinct)."""
    words = " ".join(w[:1].upper() + w[1:] for w in name.split(" "))
    return list(dict.fromkeys([name, name.lower(), words, name.upper()]))


def subject_variants(tok, subject: str, aliases: Sequence[str] = ()) -> list[tuple[int, ...]]:
    """Token ids of `subject` and its aliases, in each of their `casings`, after a space and at the start of a
    text (distinct, non-empty)."""
    forms = {tuple(tok(lead + name, add_special_tokens=False)["input_ids"])
             for written in [subject, *aliases] for name in casings(written) for lead in (" ", "")}
    return sorted(f for f in forms if f)


def _past_length(cache) -> int:
    """Tokens a KV cache already holds (0 for none)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


@dataclass
class EntityMemory:
    """Subject -> residual vector at one layer's output; see the module docstring."""

    tok: object  # the model's tokenizer (subjects are matched on its token ids)
    layer: int  # decoder block whose output the slots are added to
    slots: dict[str, torch.Tensor] = field(default_factory=dict)  # subject -> (d,) delta
    aliases: dict[str, list[str]] = field(default_factory=dict)  # subject -> other names that fire its slot
    keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # answer-site slots: subject ->
    #   (keys (m, d), radii (m,)): the slot fires where the prompt's last state is within a key's radius
    answers: dict[str, list[int]] = field(default_factory=dict)  # answer-site slots: subject -> tokens the unedited
    #   model answers its edits' prompts with; the slot also fires where the model without the memory says one of them
    enabled: bool = True  # False inside suspended()
    _index: dict[int, list[tuple[tuple[int, ...], str]]] = field(default_factory=dict)  # last token -> forms
    _ids: torch.Tensor | None = None  # input ids of the forward call in progress (None: a decoding step)
    _plain: list[int | None] | None = None  # per row of that call: the greedy token at its prompt's end without the
    #   memory (None: not read, no subject with `answers` named in the row)
    _head: nn.Module | None = None  # the attached model's output embedding (reads `_plain`)

    def write(self, w: MemoryWrite) -> None:
        """Set the slots of `w` (replacing earlier slots of the same subjects)."""
        if w.layer != self.layer:
            raise ValueError(f"memory write for layer {w.layer}, but this memory lives at layer {self.layer}")
        for subject, delta in zip(w.subjects, w.deltas):
            if not torch.isfinite(delta).all():
                raise ValueError(f"memory delta for subject {subject!r} contains NaN or Inf")
            self.slots[subject] = delta.detach().float().cpu().clone()
            self.aliases.pop(subject, None)
            self.keys.pop(subject, None)
            self.answers.pop(subject, None)
        if w.keys is not None:
            self.keys.update(_slot_keys(w))
        self.aliases.update({s: list(a) for s, a in w.aliases.items() if s in self.slots and a})
        self.answers.update({s: list(a) for s, a in w.answers.items() if s in self.keys and a})
        self._reindex()

    def clear(self) -> None:
        self.slots.clear()
        self.aliases.clear()
        self.keys.clear()
        self.answers.clear()
        self._reindex()

    @classmethod
    def from_write(cls, tok, w: MemoryWrite | None) -> "EntityMemory | None":
        """A memory holding exactly `w`'s slots (None when there is nothing to hold)."""
        if w is None:
            return None
        memory = cls(tok, w.layer)
        memory.write(w)
        return memory

    def load(self, w: MemoryWrite | None) -> None:
        """Exactly the slots of `w` (none when `w` is None): what a ledger's committed batches hold."""
        self.clear()
        if w is not None:
            self.write(w)

    def snapshot(self) -> MemoryWrite | None:
        """The slots as one write (None when empty): `load(snapshot())` restores them."""
        if not self.slots:
            return None
        return MemoryWrite(self.layer, list(self.slots), torch.stack(list(self.slots.values())), dict(self.aliases),
                           *stack_keys(list(self.slots), self.keys), dict(self.answers))

    def _reindex(self) -> None:
        self._index = {}
        for subject in self.slots:
            for form in subject_variants(self.tok, subject, self.aliases.get(subject, ())):
                self._index.setdefault(form[-1], []).append((form, subject))
        for forms in self._index.values():
            forms.sort(key=lambda f: -len(f[0]))

    def matches(self, ids: Sequence[int], end: int | None = None) -> list[tuple[int, str]]:
        """(position, subject) of every subject occurrence in `ids[:end]`, at the subject's last token."""
        out = []
        for t, x in enumerate(ids[:end]):
            for form, subject in self._index.get(x, ()):
                n = len(form)
                if t + 1 >= n and tuple(ids[t + 1 - n : t + 1]) == form:
                    out.append((t, subject))
                    break
        return out

    def _grab_ids(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prompt = isinstance(ids, torch.Tensor) and not ids.is_floating_point() and _past_length(cache) == 0
        self._ids, self._plain = (ids if prompt else None), None
        if prompt and self.enabled and self.answers:
            self._plain = self._plain_answers(module, ids, kwargs)
            self._ids = ids

    @torch.no_grad()
    def _plain_answers(self, stack: nn.Module, ids: torch.Tensor, kwargs) -> list[int | None] | None:
        """Per row of `ids`, the model's greedy token at the prompt's end without the memory, where the row names a
        subject with `answers` (else None); one extra pass of the decoder stack, without any cache."""
        ends = _PROMPT_ENDS.get()
        rows = {}
        for b, seq in enumerate(ids.tolist()):
            end = ends[b] if ends is not None and b < len(ends) else len(seq)
            if any(s in self.answers for _, s in self.matches(seq, end)):
                rows[b] = end - 1
        if not rows:
            return None
        extra = {k: kwargs[k] for k in ("attention_mask", "position_ids") if kwargs.get(k) is not None}
        with self.suspended():
            out = stack(input_ids=ids, use_cache=False, **extra)
        h = _final_hidden(out)
        b = torch.tensor(list(rows))
        top = self._head(h[b.to(h.device), torch.tensor(list(rows.values()), device=h.device)]).argmax(-1).tolist()
        plain: list[int | None] = [None] * len(ids)
        for row, token in zip(rows, top):
            plain[row] = token
        return plain

    def _add(self, _module, _args, out):
        if not (self.enabled and self.slots) or self._ids is None:
            return out
        h = output_tensor(out)
        if h.shape[:2] != self._ids.shape[:2]:
            return out
        rows, cols, subjects = [], [], []
        ends = _PROMPT_ENDS.get()
        for b, seq in enumerate(self._ids.tolist()):
            end = ends[b] if ends is not None and b < len(ends) else None
            found = self.matches(seq, end)
            rows_b = [(t, s) for t, s in found if s not in self.keys]
            plain = self._plain[b] if self._plain is not None else None
            answer = self._answer_slot(h[b], found, (end or len(seq)) - 1, plain)
            for t, subject in rows_b + answer:
                rows.append(b)
                cols.append(t)
                subjects.append(subject)
        if not rows:
            return out
        add = torch.stack([self.slots[s] for s in subjects]).to(h.device, h.dtype)
        h = h.clone()
        h[rows, cols] = h[rows, cols] + add
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def fires(self, ids: Sequence[int], state: torch.Tensor, plain: int | None = None) -> bool:
        """Whether a forward pass of the prompt `ids` adds any slot, given `state`: the memory layer's output at the
        prompt's last token (which the memory does not change), and `plain`: the model's greedy first answer token
        without the memory (None: unknown, so a slot with `answers` named in the prompt counts as firing). Where none
        fires, the prompt's greedy answer is the model's without the memory, token for token (decoding steps never
        fire a slot)."""
        if not (self.enabled and self.slots):
            return False
        found = self.matches(ids)
        if any(s not in self.keys for _, s in found):
            return True  # a subject-site slot: added wherever its subject is named
        if plain is None and any(s in self.answers for _, s in found):
            return True
        return bool(self._answer_slot(state[None], found, 0, plain))

    def _answer_slot(self, h: torch.Tensor, found: list[tuple[int, str]], last: int,
                     plain: int | None = None) -> list[tuple[int, str]]:
        """The answer-site slot of a subject named in the prompt whose key is nearest the prompt's last state, when
        within its radius, else the nearest of those whose `answers` hold `plain` (the model's own answer without
        the memory): [(last, subject)] or []."""
        named = dict.fromkeys(s for _, s in found if s in self.keys)
        if not named or last < 0:
            return []
        state = torch.nn.functional.normalize(h[last].float(), dim=0).cpu()
        score = {s: float((self.keys[s][0] @ state - self.keys[s][1]).max()) for s in named}
        best = max(score, key=score.get)
        if score[best] >= 0:
            return [(last, best)]
        recalled = [s for s in named if plain is not None and plain in self.answers.get(s, ())]
        return [(last, max(recalled, key=score.get))] if recalled else []

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["EntityMemory"]:
        """The memory active in `model`'s forward passes for the duration of the block."""
        grab = model.base_model.register_forward_pre_hook(self._grab_ids, with_kwargs=True)
        add = layers_of(model)[self.layer].register_forward_hook(self._add)
        self._head = model.get_output_embeddings()
        try:
            yield self
        finally:
            grab.remove()
            add.remove()
            self._ids, self._plain, self._head = None, None, None

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The memory off (the model answers as without it) for the duration of the block."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before



def merge_writes(writes: Sequence[MemoryWrite | None]) -> MemoryWrite | None:
    """The writes applied in order as one write: a later slot of a subject replaces an earlier one."""
    slots: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    answers: dict[str, list[int]] = {}
    layer = None
    for w in writes:
        if w is None:
            continue
        if layer is not None and w.layer != layer:
            raise ValueError(f"memory writes at layers {layer} and {w.layer} cannot be merged")
        layer = w.layer
        slots.update(zip(w.subjects, w.deltas))
        for subject in w.subjects:
            aliases.pop(subject, None)
            keys.pop(subject, None)
            answers.pop(subject, None)
        aliases.update(w.aliases)
        answers.update(w.answers)
        if w.keys is not None:
            keys.update(_slot_keys(w))
    if layer is None:
        return None
    return MemoryWrite(layer, list(slots), torch.stack(list(slots.values())),
                       {s: a for s, a in aliases.items() if s in slots}, *stack_keys(list(slots), keys),
                       {s: a for s, a in answers.items() if s in keys})


def stack_keys(subjects: list[str], keys: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """(keys (k, m, d), radii (k, m)) in `subjects`' order, padded with zero keys of NaN radius, or (None, None)
    when every slot is a subject-site one (which, among answer-site ones, has only padding)."""
    if not keys:
        return None, None
    m = max(k.shape[0] for k, _ in keys.values())
    d = next(iter(keys.values()))[0].shape[1]
    out_k, out_r = torch.zeros(len(subjects), m, d), torch.full((len(subjects), m), float("nan"))
    for i, s in enumerate(subjects):
        if s in keys:
            k, r = keys[s]
            out_k[i, : len(k)], out_r[i, : len(r)] = k, r
    return out_k, out_r


def _slot_keys(w: MemoryWrite) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """subject -> (keys, radii) of a write's answer-site slots, padding dropped."""
    out = {}
    for s, k, r in zip(w.subjects, w.keys, w.radii):
        real = ~torch.isnan(r)
        if real.any():
            out[s] = (k[real].detach().float().cpu().clone(), r[real].detach().float().cpu().clone())
    return out


EXPORT_FILE = "entity_memory.safetensors"


def load_exported(model_dir, model: nn.Module, tok) -> contextlib.AbstractContextManager:
    """The entity memory `kagent export` wrote beside a checkpoint, attached to `model` for a `with` block
    (a no-op context when the export holds no memory)::

        with load_exported(path, model, tok):
            model.generate(...)
    """
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(model_dir) / EXPORT_FILE
    memory = EntityMemory.from_write(tok, MemoryWrite.from_tensors(load_file(str(path)))) if path.exists() else None
    return memory.attached(model) if memory is not None else contextlib.nullcontext()
