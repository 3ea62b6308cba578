"""What a batch of edits costs in RAM: its peak estimated from token counts, and the process's measured peak.

`estimate(dims, edits, hp)` predicts the working RAM (MiB) a batch adds to the process in each of the editor's
phases, which run one after another:

- Target values (editors/optimise.py + values.py), per chunk of `value_chunk` edits sorted by suffix length as the
  optimiser sorts them. A chunk has B = edits x (1 + n_context + 1 KL) rows, padded to prefix width P and suffix
  width S; each step runs the suffix through the L blocks above the last edited layer with gradients. Saved for the
  backward pass, per row, suffix column and block: 6d + 2kv + 4i values (both norms' inputs and outputs, q, k after
  rotary, v, the attention output, the MLP's gate, up, activation and product); per row, key column (K = P + S)
  and block, the keys and values repeated to every head, 2hd. Kept across steps: the prefix keys/values of every
  block, B P 2kv per block. Transient: the additive mask (B S K, with its boolean helpers), the logits at target
  positions with log-softmax and their gradients (4 (B T + edits) V) and one block's gradients in flight.
  Architectures without the block runner run every block over P + S columns and keep attention probabilities.
- Keys (editors/keys.py), no gradients: every key row (edits x (1 + n_context)) through one block at a time, and
  the float64 normal matrix of the solve.
- Probes of the batch's prompts (`scoring`: one padded no-grad forward, logits at the answer positions).

`scoring` and `whitening` are public so that the agent can add its own probes (held-out perplexity, superposition)
to a batch's estimate (agent/budget.py). Counts are elements of the model's dtype; `CALIBRATION` x counts +
`SLACK_MB` is fitted so that the estimate stays at or above the peak RSS measured on SmolLM2-135M by
`scripts/ram_calibration.py` (figures in RELIABILITY.md).

The process itself: `page_in` reads every weight once (a checkpoint loaded from safetensors is memory-mapped and
counts in RSS only once used, so an idle process looks ~0.5 GB lighter than it will be), `resident_mb` is RSS with
freed heap returned to the OS (psutil), `reset_peak` / `peak_mb` the kernel's high-water mark (Linux /proc, which
psutil does not read; elsewhere the peak since the process started).
"""
from __future__ import annotations

import ctypes
import gc
import resource
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from editors.arch import arch_of, n_layers
from editors.hparams import EditHParams
from editors.prompts import EditRequest, key_rows, value_rows

MIB = 2**20
CALIBRATION = 1.15  # estimate = CALIBRATION * counted bytes + SLACK_MB (scripts/ram_calibration.py)
SLACK_MB = 256.0  # allocator and framework temporaries the counts leave out (128 left a long prefix 9% under)
PROBE_BATCH = 64  # pairs per probe forward (evaluators.scoring.DEFAULT_BATCH)


@dataclass(frozen=True)
class Dims:
    """The model dimensions the estimate needs."""

    hidden: int  # d
    inter: int  # MLP width i (also the edited module's input width)
    heads: int  # attention heads h
    head_dim: int
    kv_dim: int  # key/value width per token (kv heads x head_dim)
    vocab: int  # V
    layers: int  # decoder blocks
    dtype_bytes: int  # bytes per element of the model's weights
    fast: bool  # the block runner (rotary decoders): only blocks above the edited layer run with gradients

    @classmethod
    def of(cls, model: nn.Module) -> "Dims":
        cfg = model.config
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
        return cls(hidden, inter, heads, head_dim, kv_heads * head_dim, cfg.vocab_size, n_layers(model),
                   next(model.parameters()).element_size(), arch_of(model).rotary is not None)


@dataclass(frozen=True)
class EditTokens:
    """One edit's sizes in tokens, as the editor will run it."""

    rows: tuple[tuple[int, int, int], ...]  # (prefix, suffix, target) of each value row, the KL row last
    key_len: int  # longest key row (tokens through the subject, in any context)
    probe_len: int  # the prompt and " " + target, as the probes score them

    @property
    def order(self) -> int:
        """The optimiser's chunking order: the plain row's suffix (tail + target tokens)."""
        return self.rows[0][1]


def edit_tokens(tok, request: EditRequest, templates: list[str], hp: EditHParams | None = None) -> EditTokens:
    """The token counts of `request`'s value rows as `hp`'s optimiser builds them (None: subject-site rows)."""
    rows = value_rows(tok, [request], templates, site=hp.value_site if hp is not None else "subject")
    keys = key_rows(tok, [request], templates)
    probe = len(tok(request.text())["input_ids"]) + len(tok(" " + request.target, add_special_tokens=False)["input_ids"])
    return EditTokens(tuple((len(r.prefix), len(r.suffix), len(r.target_cols)) for r in rows),
                      max(len(k) for k in keys), probe)


@dataclass(frozen=True)
class Footprint:
    """Estimated working RAM of a batch (MiB), per phase; the batch needs the largest."""

    values_mb: float
    keys_mb: float
    probes_mb: float

    @property
    def working_mb(self) -> float:
        return max(self.values_mb, self.keys_mb, self.probes_mb)


def _value_chunk(d: Dims, chunk: list[EditTokens], layer: int) -> float:
    """Elements one value chunk holds at its peak (the first backward pass)."""
    rows = [r for e in chunk for r in e.rows]
    B, P = len(rows), max(r[0] for r in rows)
    S, T = max(r[1] for r in rows), max(max(r[2] for r in rows), 1)
    above = d.layers - layer - 1 if d.fast else d.layers
    width, K = (S if d.fast else P + S), P + S
    repeated_kv = B * 2 * d.heads * d.head_dim * K
    saved = above * (B * width * (6 * d.hidden + 2 * d.kv_dim + 4 * d.inter) + repeated_kv)
    if not d.fast:
        saved += above * B * d.heads * width * K  # attention probabilities, kept for the backward pass
    kept = B * P * 2 * d.kv_dim * d.layers
    transient = 2 * B * width * K + 4 * (B * T + len(chunk)) * d.vocab
    transient += B * width * (4 * d.hidden + 3 * d.inter) + repeated_kv
    return saved + kept + transient


def _keys(d: Dims, edits: list[EditTokens], n_context: int) -> float:
    rows, W = len(edits) * (1 + n_context), max(e.key_len for e in edits)
    block = rows * W * (3 * d.inter + 6 * d.hidden) + rows * 2 * d.heads * d.head_dim * W + 2 * rows * W * W
    solve = 4 * d.inter * d.inter * 8 / d.dtype_bytes  # float64 normal matrix, its factor and right-hand sides
    return rows * W * d.hidden + block + solve


def scoring(d: Dims, rows: int, width: int, logit_rows: int) -> float:
    """Elements of one no-grad forward of `rows` padded to `width` tokens with the LM head on `logit_rows`
    positions (logits, log-softmax and the loss's temporaries)."""
    block = rows * width * (3 * d.inter + 6 * d.hidden) + rows * 2 * d.heads * d.head_dim * width
    return rows * width * d.hidden + block + 2 * rows * width * width + 3 * logit_rows * d.vocab


def whitening(d: Dims) -> float:
    """Elements of whitening keys with C0^-1/2 (eigendecomposition of a float64 i x i matrix and its products)."""
    return 6 * d.inter * d.inter * 8 / d.dtype_bytes


def _probes(d: Dims, edits: list[EditTokens]) -> float:
    rows = min(len(edits), PROBE_BATCH)
    answer_rows = rows * max(e.rows[0][2] for e in edits)
    return scoring(d, rows, max(e.probe_len for e in edits), answer_rows)


def mib(d: Dims, elements: float) -> float:
    """Calibrated MiB of a count of elements (see the module docstring)."""
    return CALIBRATION * elements * d.dtype_bytes / MIB + SLACK_MB


def estimate(d: Dims, edits: list[EditTokens], hp: EditHParams) -> Footprint:
    """The working RAM of editing `edits` as one batch (values chunked as the optimiser chunks them)."""
    ordered = sorted(edits, key=lambda e: e.order)
    chunks = [ordered[i: i + hp.value_chunk] for i in range(0, len(ordered), hp.value_chunk)]
    values = max(_value_chunk(d, c, hp.value_layer) for c in chunks)
    return Footprint(mib(d, values), mib(d, _keys(d, edits, hp.n_context)), mib(d, _probes(d, edits)))


# ----------------------------------------------------------------------------- the process itself


@torch.no_grad()
def page_in(model: nn.Module) -> None:
    """Read every weight once, so that memory-mapped weights are resident before RAM is measured."""
    for p in model.parameters():
        p.sum()


def _hwm_mb() -> float | None:
    """The kernel's resettable peak-RSS mark (VmHWM), which psutil does not expose; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resident_mb() -> float:
    """Resident RAM (RSS) now, after returning freed heap to the OS (what the process really holds)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False when it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident RAM since the last `reset_peak` (VmHWM), else since the process started."""
    hwm = _hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
