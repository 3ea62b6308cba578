"""Two more ways to write the memory tier's answer-site slots into the weights (issue 27), measured on a workspace.

The compaction's own solves (ENCORE, AlphaEdit's null space) write at the subject and rewrite it (BENCHMARKS.md, "Two
tiers"). These write where the memory's slots act - block `memory_layer`'s output at the prompt's last token:

- `lsq`: the down projection of that block solved in closed form: keys = its inputs at the last token of every prompt
  that fires a slot (value: the slot's delta) and of the subject's other statements (value: 0), with `lam` x the
  block's key covariance on WikiText (the MEMIT/ENCORE normal equations, keyed like the slots);
- `distill`: the block's whole MLP (gate, up, down) trained by Adam to give, at every position of those prompts, of the
  prompts with their target appended, of the edit prompt with other edited subjects, and of WikiText, the unedited
  MLP's output - plus the slot's delta at each slot-firing prompt's last token.

Each is measured with the memory off: facts answered, known facts and perplexity (the probes), same-subject
specificity of the answering facts (their stored statements, as the compaction counts it) and the CounterFact
neighbour prompts of the feed beside the workspace (greedy 5 tokens, unchanged share). The model is restored after.

    python scripts/weights_tier_designs.py WS --design lsq --lam 300 3000 30000
    python scripts/weights_tier_designs.py WS --design distill --steps 300 --pos-weight 10
WS: a workspace whose facts are in the memory tier, with the feed it watched at WS/../feed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from agent.session import open_session
from agent.tiers import weights_answer
from agent.workspace import Workspace
from editors.arch import layers_of
from editors.hooks import StopForward, forward_hook
from editors.prompts import in_context
from editors.stats import default_corpus, layer_stats
from evaluators.probes import same_subject
from evaluators.specificity import Probe, generate_answers


@torch.no_grad()
def mlp_io(model, tok, texts: list[str], layer: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text, block `layer`'s MLP input and output at every position, (n, d) and (n, d) (the pass stops there)."""
    mlp, got, out = layers_of(model)[layer].mlp, {}, []

    def grab(_m, args, o):
        got["x"], got["y"] = args[0], o
        raise StopForward

    with forward_hook(mlp, grab):
        for s in range(0, len(texts), batch):
            ids = tok(texts[s: s + batch]).input_ids
            w = max(map(len, ids))
            x = torch.tensor([i + [0] * (w - len(i)) for i in ids])
            m = torch.tensor([[1] * len(i) + [0] * (w - len(i)) for i in ids])
            try:
                model.base_model(input_ids=x, attention_mask=m)
            except StopForward:
                pass
            out += [(got["x"][b, : len(i)].float(), got["y"][b, : len(i)].float()) for b, i in enumerate(ids)]
    return out


def down_keys(model, tok, texts: list[str], layer: int) -> torch.Tensor:
    """(n, i) inputs of block `layer`'s down projection at each text's last token."""
    mlp = layers_of(model)[layer].mlp
    rows = [x[-1:] for x, _ in mlp_io(model, tok, texts, layer)]
    x = torch.cat(rows)
    return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).double()


def prompts(session, facts) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(slot-firing prompt, subject, target) triples; the subjects' other statements; each edit prompt with 4 other
    edited subjects."""
    ctx = ["{}", *session.editor.state.context_templates]
    pos, neg, others = [], [], []
    subjects = [f.record.subject for f in facts]
    for f in facts:
        r = session.request(f)
        pos += [(in_context(c, t).replace("{}", s, 1), r.subject, r.target)
                for t, s in [(r.prompt, r.subject), *r.cues] for c in ctx]
        pos += [(t.replace("{}", s, 1), r.subject, r.target) for t, s in r.forms]
        neg += [f"{r.subject} is a", f"{r.subject} is"] + [t.replace("{}", r.subject, 1) for t in r.keep]
        g = torch.Generator().manual_seed(f.id)
        rest = [s for s in subjects if s != r.subject]
        others += [r.prompt.replace("{}", rest[j], 1) for j in torch.randperm(len(rest), generator=g)[:4].tolist()]
    firing = {p for p, _, _ in pos}
    return pos, neg, [t for t in others if t not in firing]


def lsq(session, facts, lam: float, cache: dict) -> float:
    """Write the closed-form down-projection update; returns its norm."""
    model, tok, mem = session.model, session.tok, session.editor.memory
    L = mem.layer
    if "Kp" not in cache:
        pos, neg, _ = prompts(session, facts)
        with mem.suspended():
            cache["Kp"] = down_keys(model, tok, [p for p, _, _ in pos], L)
            cache["Kn"] = down_keys(model, tok, neg, L)
        cache["R"] = torch.stack([mem.slots[s].double() for _, s, _ in pos])
        cache["C"] = layer_stats(model, tok, [L], default_corpus(), session.editor.hp.stats_tokens)[L].mom2.double()
    Kp, Kn, R, C = cache["Kp"], cache["Kn"], cache["R"], cache["C"]
    dW = torch.linalg.solve(lam * C + Kp.T @ Kp + Kn.T @ Kn, Kp.T @ R).T
    w = layers_of(model)[L].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(dW.to(w.dtype))
    return float(dW.norm())


def distill(session, facts, steps: int, pos_weight: float) -> float:
    """Train block L's MLP towards the memory's outputs; returns the relative change of its weights."""
    model, tok, mem = session.model, session.tok, session.editor.memory
    L = mem.layer
    pos, neg, others = prompts(session, facts)
    ids = tok(default_corpus()[:400_000]).input_ids[:40_000]
    wiki = [tok.decode(ids[i: i + 128]) for i in range(0, len(ids), 128)]
    with mem.suspended():
        fired = mlp_io(model, tok, [p for p, _, _ in pos], L)
        answered = mlp_io(model, tok, [p + " " + t for p, _, t in pos], L)
        plain = mlp_io(model, tok, neg + others + wiki, L)
    x_pos = torch.stack([x[-1] for x, _ in fired])
    y_pos = torch.stack([y[-1] + mem.slots[s].float() for (_, y), (_, s, _) in zip(fired, pos)])
    n = [len(x) for x, _ in fired]
    x_keep = torch.cat([x[:-1] for x, _ in fired] + [x[k:] for (x, _), k in zip(answered, n)] + [x for x, _ in plain])
    y_keep = torch.cat([y[:-1] for _, y in fired] + [y[k:] for (_, y), k in zip(answered, n)] + [y for _, y in plain])
    mlp = layers_of(model)[L].mlp
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    base = [p.detach().clone() for p in params]
    scale = float(y_keep.pow(2).sum(1).mean())
    opt = torch.optim.Adam(params, lr=1e-4)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for step in range(steps):
            pick = torch.randint(0, len(x_keep), (4096,))
            keep = (mlp(x_keep[pick]) - y_keep[pick]).pow(2).sum(1).mean() / scale
            fire = (mlp(x_pos) - y_pos).pow(2).sum(1).mean() / scale
            opt.zero_grad()
            (keep + pos_weight * fire).backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"step {step}: unchanged-output loss {keep.item():.4f}, slot-output loss {fire.item():.4f}")
        for p in params:
            p.requires_grad_(False)
    return max(float((p - b).norm() / b.norm()) for p, b in zip(params, base))


def measure(session, facts, neighbours: list[str], base_answers: list[str]) -> dict:
    model, tok = session.model, session.tok
    with session.editor.memory.suspended(), torch.no_grad():
        answers = weights_answer(model, tok, facts)
        probes = session.probes.downstream(model, tok)
        solved = [f for f in facts if answers[f.id]]
        kept = same_subject.kept_by_fact(model, tok, solved, session.ledger.probes())
        now = [a.text for a in generate_answers(model, tok, [Probe(p, 5) for p in neighbours])]
    pairs = [v for v in kept.values() if None not in v]
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {"answer": sum(answers.values()), "facts": len(facts), **probes,
            "specificity": mean([w for _, w in pairs]), "memory_specificity": mean([m for m, _ in pairs]),
            "neighbours_unchanged": mean([float(a == b) for a, b in zip(base_answers, now)])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--design", choices=["lsq", "distill"], required=True)
    ap.add_argument("--lam", type=float, nargs="+", default=[3000.0], help="lsq: covariance weights to try")
    ap.add_argument("--steps", type=int, default=300, help="distill: Adam steps")
    ap.add_argument("--pos-weight", type=float, default=10.0, help="distill: weight of the slot outputs' loss")
    a = ap.parse_args()
    session = open_session(Workspace(a.workspace.resolve()))
    facts = session.ledger.facts(status="applied")
    feed = [json.loads(line) for line in open(a.workspace.resolve().parent / "feed.jsonl")]
    neighbours = [n["prompt"] for rec in feed for n in rec.get("neighbors", [])]
    mlp = layers_of(session.model)[session.editor.memory.layer].mlp
    saved = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    with session.editor.memory.suspended():
        base = [x.text for x in generate_answers(session.model, session.tok, [Probe(p, 5) for p in neighbours])]
        print(json.dumps({"unedited": session.probes.downstream(session.model, session.tok)}), flush=True)
    cache: dict = {}
    runs = [("lam", lam) for lam in a.lam] if a.design == "lsq" else [("steps", a.steps)]
    for key, value in runs:
        t0 = time.perf_counter()
        size = lsq(session, facts, value, cache) if a.design == "lsq" else distill(session, facts, a.steps, a.pos_weight)
        row = {"design": a.design, key: value, "update": size, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row | measure(session, facts, neighbours, base)), flush=True)
        mlp.load_state_dict(saved)
    session.close()


if __name__ == "__main__":
    main()
