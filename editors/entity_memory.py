"""Entity memory: per edited subject, one residual vector added to a layer's output at the subject's last token.

The weights of a small model cannot hold many edits without damage (BENCHMARKS.md, "frontier"): every
closed-form update to an MLP also moves the outputs of keys it was not meant for. The entity memory writes
an edit where it was optimised instead: the target-value optimisation finds a vector `delta` that, added to
layer L's output at the subject's last token, makes the model answer the target; the memory adds exactly
that vector at exactly that place, whenever the subject's tokens occur in the input, and nothing anywhere
else. Prompts about other subjects see the unedited model bit for bit.

A slot is keyed by the subject text and matched on token ids: the subject tokenised with and without a
leading space (the two forms a BPE tokenizer gives a word after a space and at the start of a text or after
punctuation). Where several subjects match at one position the longest wins. Matching needs the input ids,
which a pre-hook on the input embeddings records; with a KV cache a subject is matched within one forward
call (the prompt's prefill), so a subject the model generates itself does not trigger its slot.

Hooks are installed only by `attached()`, a context manager that always removes them; `suspended()`
turns the memory off inside it (the value optimisation runs on the model without the memory).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
import contextlib
from contextlib import contextmanager
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

    def __post_init__(self) -> None:
        if len(self.subjects) != self.deltas.shape[0]:
            raise ValueError(f"{len(self.subjects)} subjects but {self.deltas.shape[0]} memory deltas")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The write as named tensors (subjects as UTF-8 JSON bytes), for safetensors files."""
        return {"memory.layer": torch.tensor([self.layer], dtype=torch.int64),
                "memory.subjects": torch.frombuffer(bytearray(json.dumps(self.subjects).encode()), dtype=torch.uint8),
                "memory.deltas": self.deltas.detach().float().cpu().contiguous()}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "MemoryWrite | None":
        """The write stored by `tensors()` (None when the tensors hold none)."""
        if "memory.deltas" not in tensors:
            return None
        subjects = json.loads(bytes(tensors["memory.subjects"].tolist()).decode())
        return MemoryWrite(int(tensors["memory.layer"][0]), subjects, tensors["memory.deltas"])


def subject_variants(tok, subject: str) -> list[tuple[int, ...]]:
    """Token ids of `subject` after a space and at the start of a text (distinct, non-empty)."""
    forms = {tuple(tok(" " + subject, add_special_tokens=False)["input_ids"]),
             tuple(tok(subject, add_special_tokens=False)["input_ids"])}
    return sorted(f for f in forms if f)


@dataclass
class EntityMemory:
    """Subject -> residual vector at one layer's output; see the module docstring."""

    tok: object  # the model's tokenizer (subjects are matched on its token ids)
    layer: int  # decoder block whose output the slots are added to
    slots: dict[str, torch.Tensor] = field(default_factory=dict)  # subject -> (d,) delta
    enabled: bool = True  # False inside suspended()
    _index: dict[int, list[tuple[tuple[int, ...], str]]] = field(default_factory=dict)  # last token -> forms
    _ids: torch.Tensor | None = None  # input ids of the forward call in progress

    def write(self, w: MemoryWrite) -> None:
        """Set the slots of `w` (replacing earlier slots of the same subjects)."""
        if w.layer != self.layer:
            raise ValueError(f"memory write for layer {w.layer}, but this memory lives at layer {self.layer}")
        for subject, delta in zip(w.subjects, w.deltas):
            if not torch.isfinite(delta).all():
                raise ValueError(f"memory delta for subject {subject!r} contains NaN or Inf")
            self.slots[subject] = delta.detach().float().cpu().clone()
        self._reindex()

    def clear(self) -> None:
        self.slots.clear()
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
        return MemoryWrite(self.layer, list(self.slots), torch.stack(list(self.slots.values())))

    def _reindex(self) -> None:
        self._index = {}
        for subject in self.slots:
            for form in subject_variants(self.tok, subject):
                self._index.setdefault(form[-1], []).append((form, subject))
        for forms in self._index.values():
            forms.sort(key=lambda f: -len(f[0]))

    def matches(self, ids: Sequence[int]) -> list[tuple[int, str]]:
        """(position, subject) of every subject occurrence in `ids`, at the subject's last token."""
        out = []
        for t, x in enumerate(ids):
            for form, subject in self._index.get(x, ()):
                n = len(form)
                if t + 1 >= n and tuple(ids[t + 1 - n : t + 1]) == form:
                    out.append((t, subject))
                    break
        return out

    def _grab_ids(self, _module, args, kwargs=None):
        ids = args[0] if args else (kwargs or {}).get("input", None)
        self._ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None

    def _add(self, _module, _args, out):
        if not (self.enabled and self.slots) or self._ids is None:
            return out
        h = output_tensor(out)
        rows, cols, subjects = [], [], []
        for b, seq in enumerate(self._ids.tolist()):
            for t, subject in self.matches(seq):
                rows.append(b)
                cols.append(t)
                subjects.append(subject)
        if not rows or h.shape[:2] != self._ids.shape[:2]:
            return out
        add = torch.stack([self.slots[s] for s in subjects]).to(h.device, h.dtype)
        h = h.clone()
        h[rows, cols] = h[rows, cols] + add
        return (h, *out[1:]) if isinstance(out, tuple) else h

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["EntityMemory"]:
        """The memory active in `model`'s forward passes for the duration of the block."""
        grab = model.get_input_embeddings().register_forward_pre_hook(self._grab_ids)
        add = layers_of(model)[self.layer].register_forward_hook(self._add)
        try:
            yield self
        finally:
            grab.remove()
            add.remove()
            self._ids = None

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
    layer = None
    for w in writes:
        if w is None:
            continue
        if layer is not None and w.layer != layer:
            raise ValueError(f"memory writes at layers {layer} and {w.layer} cannot be merged")
        layer = w.layer
        slots.update(zip(w.subjects, w.deltas))
    return None if layer is None else MemoryWrite(layer, list(slots), torch.stack(list(slots.values())))


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
