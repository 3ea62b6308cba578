"""The target-value loop: Adam on one delta per edit, with a pluggable stopping rule.

Loss per edit = mean target NLL over its prompts (the edit prompt in every context, its other forms)
+ kl_factor * KL on "{subject} is a" + keep_factor * mean KL on its `keep` prompts (the subject's other
relations, held where the unedited model has them) + weight_decay * ||delta|| / ||h0||^2 (the reference formula), with ||delta|| clamped to
clamp_factor * ||h0||. Stopping rules: "nll" (MEMIT: NLL below a threshold) and "mpes"
(ENCORE's Most-Probable Early Stopping: every target token is the argmax in every prompt,
for `mpes_patience` consecutive checks). A stopped edit leaves the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from editors.hparams import EditHParams
from editors.devices import input_device
from editors.prompts import EditRequest, answer_texts, n_target_rows, row_contexts, split_at_subject, value_rows
from editors.values import SuffixRunner, make_batch


@dataclass
class ValueResult:
    z: torch.Tensor  # (n, d) target outputs of the last edited layer
    steps: list[int]  # forward checks each edit took
    flops: float  # matmul FLOPs spent
    delta: torch.Tensor | None = None  # (n, d) z - h0: the residual each edit adds at its subject's last token
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # answer-site rows: prompt text -> the layer's
    #   output at its last token on the unedited rows (what an answer-site slot's keys are read from)


@dataclass
class _Adam:
    m: torch.Tensor
    v: torch.Tensor
    lr: float

    def step(self, p: torch.Tensor, idx: torch.Tensor, t: int, b1=0.9, b2=0.999, eps=1e-8) -> None:
        g = p.grad[idx]
        self.m[idx] = b1 * self.m[idx] + (1 - b1) * g
        self.v[idx] = b2 * self.v[idx] + (1 - b2) * g * g
        mhat, vhat = self.m[idx] / (1 - b1**t), self.v[idx] / (1 - b2**t)
        p.data[idx] -= self.lr * mhat / (vhat.sqrt() + eps)


def _per_request(values: torch.Tensor, req: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, req, values)


@dataclass
class _Reference:
    kl: torch.Tensor | None = None  # (n_kl_rows, V) log-probs on the KL prompts, read at the first step (delta == 0)


def _losses(runner: SuffixRunner, lm_head: nn.Module, delta, h0, ref: _Reference, n: int,
            n_prompts: torch.Tensor, hp: EditHParams):
    b = runner.batch
    hs = runner.run(delta[b.req])  # (B, T, d)
    logp = F.log_softmax(lm_head(hs[b.tmask]).float(), -1).to(b.ttok.device)  # (Npos, V)
    tok = b.ttok[b.tmask]
    row = torch.nonzero(b.tmask)[:, 0]
    nll_tok = -logp.gather(1, tok[:, None])[:, 0]
    counts = b.tmask.sum(1).clamp(min=1).float()
    row_nll = torch.zeros(len(b.req), device=hs.device).index_add_(0, row, nll_tok) / counts
    nll = _per_request(row_nll, b.req, n) / n_prompts
    wrong = _per_request((logp.argmax(-1) != tok).float(), b.req[row], n)
    kl_logp = F.log_softmax(lm_head(hs[b.is_kl, 0]).float(), -1).to(b.ttok.device)
    kl_req = b.req[b.is_kl]
    if ref.kl is None:  # delta is still zero: this is the unedited distribution (KL and its gradient are 0)
        ref.kl = kl_logp.detach()
    kl_rows = (kl_logp.exp() * (kl_logp - ref.kl[b.kid[b.is_kl]])).sum(-1)
    kl = _per_request(b.kw[b.is_kl] * kl_rows, kl_req, n)
    wd = delta.norm(dim=1) / h0.norm(dim=1) ** 2
    loss = nll + kl + hp.weight_decay * wd
    runner.flops += 4 * (len(tok) + len(kl_req)) * lm_head.weight.numel()
    return loss, nll.detach(), wrong == 0


def optimise_chunk(model: nn.Module, tok, requests: list[EditRequest], templates: list[str],
                   hp: EditHParams, layer: int, groups: list[int] | None = None) -> ValueResult:
    """Target values of one chunk; requests with the same `groups` entry (0..G-1) share one delta."""
    device = input_device(model)
    rows = value_rows(tok, requests, templates, hp.kl_factor, hp.keep_factor, hp.value_site)
    batch, P = make_batch(rows, tok.pad_token_id or 0, device)
    runner = SuffixRunner(model, layer)
    runner.precompute(batch, P, row_contexts(tok, templates))
    lm_head = model.get_output_embeddings()
    n = len(requests)
    n_prompts = torch.tensor(n_target_rows(requests, templates), dtype=torch.float32, device=device)
    group = torch.tensor(groups if groups is not None else range(n), device=device)
    G = int(group.max()) + 1
    plain = torch.tensor([next(k for k, r in enumerate(rows) if r.request == i) for i in range(n)], device=device)
    h0 = runner.h_layer()[plain].detach().to(device, torch.float32)  # values, their Adam state and deltas: fp32
    states = _row_states(requests, templates, runner.h_layer()) if hp.value_site == "answer" else {}
    ref = _Reference()
    delta = torch.zeros(G, h0.shape[1], device=device, requires_grad=True)
    adam = _Adam(torch.zeros_like(delta), torch.zeros_like(delta), hp.lr)
    steps = torch.zeros(n, dtype=torch.long)
    streak = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.arange(G, device=device)  # groups still optimising
    max_norm = hp.clamp_factor * torch.zeros(G, device=device).scatter_reduce_(
        0, group, h0.norm(dim=1), "mean", include_self=False)
    for it in range(hp.max_steps):
        loss, nll, all_top = _losses(runner, lm_head, delta[group], h0, ref, n, n_prompts, hp)
        steps[torch.isin(group, active).cpu()] += 1
        streak = torch.where(all_top, streak + 1, torch.zeros_like(streak))
        done_req = streak >= hp.mpes_patience if hp.stop == "mpes" else nll < hp.nll_stop
        done = torch.ones(G, device=device).scatter_reduce_(0, group, done_req.float(), "amin") > 0.5
        keep = active[~done[active]]
        if len(keep) == 0 or it == hp.max_steps - 1:
            break
        loss[torch.isin(group, keep)].sum().backward()
        with torch.no_grad():
            adam.step(delta, keep, it + 1)
            norms = delta[keep].norm(dim=1)
            scale = (max_norm[keep] / norms.clamp(min=1e-12)).clamp(max=1.0)
            delta.data[keep] *= scale[:, None]
        delta.grad = None
        if len(keep) < len(active):
            runner.select(torch.isin(group[runner.batch.req], keep).nonzero()[:, 0])
            active = keep
    return ValueResult((h0 + delta[group]).detach(), steps.tolist(), runner.flops, delta[group].detach(), states)


def _row_states(requests: list[EditRequest], templates: list[str], h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Answer-site rows' prompt texts (in `value_rows`' order: each request in every template, then its forms) ->
    their states `h` at the prompt's last token."""
    texts = [t for r in requests for t in answer_texts(r, templates)]
    if len(texts) != len(h):
        raise ValueError(f"{len(texts)} answer-site prompts but {len(h)} value rows")
    return dict(zip(texts, h.detach().float().cpu()))


def _suffix_length(tok, req: EditRequest) -> int:
    _head, tail = split_at_subject(tok, req.prompt, req.subject)
    return len(tail) + len(tok(" " + req.target, add_special_tokens=False)["input_ids"])


def _chunks(tok, requests: list[EditRequest], groups: list[int], size: int) -> list[list[int]]:
    """Request indices in chunks of about `size`, whole groups together, shorter suffixes first."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members.values(), key=lambda m: max(_suffix_length(tok, requests[i]) for i in m))
    chunks: list[list[int]] = [[]]
    for m in order:
        if chunks[-1] and len(chunks[-1]) + len(m) > size:
            chunks.append([])
        chunks[-1] += m
    return [c for c in chunks if c]


def optimise_values(model: nn.Module, tok, requests: list[EditRequest], templates: list[str],
                    hp: EditHParams, progress=None, groups: list[int] | None = None) -> ValueResult:
    """Target values z (n, d) at layer hp.value_layer for all requests, in chunks of about hp.value_chunk.

    Requests with equal `groups` entries share one delta (the entity memory's one slot per subject); by
    default every request is its own group. Chunks hold whole groups, shorter suffixes first, so that padded
    rows waste little compute.
    """
    groups = list(range(len(requests))) if groups is None else list(groups)
    zs, deltas, steps, flops, order, states = [], [], [], 0.0, [], {}
    for chunk in _chunks(tok, requests, groups, hp.value_chunk):
        local = {g: k for k, g in enumerate(dict.fromkeys(groups[i] for i in chunk))}
        r = optimise_chunk(model, tok, [requests[i] for i in chunk], templates, hp, hp.value_layer,
                           [local[groups[i]] for i in chunk])
        zs.append(r.z)
        deltas.append(r.delta)
        steps += r.steps
        flops += r.flops
        order += chunk
        states |= r.states
        if progress is not None:
            progress.update(len(r.steps))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    at = inverse.to(zs[0].device)
    return ValueResult(torch.cat(zs)[at], [steps[k] for k in inverse.tolist()], flops, torch.cat(deltas)[at], states)
