"""The design issue 27 names for writing the memory into the weights: distil the memory-equipped model's *answers*
into several MLPs - cross-entropy on each fact's slot-firing prompts followed by its target, KL to the unedited model
on the subjects' other statements, on each edit prompt with other edited subjects and on WikiText windows - then
measure with the memory off as `weights_tier_designs.py` does (facts answered, known facts, perplexity, same-subject
specificity, CounterFact neighbours). The chat-template forms are left out (their 40 tokens would triple a step).

    python scripts/weights_tier_distill_logits.py WS --steps 60 --lr 1e-4 --layers 12 20 --kl-weight 1
WS: a workspace whose facts are in the memory tier, with the feed it watched at WS/../feed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weights_tier_designs import measure, prompts  # noqa: E402  (the same prompts and measure as the other designs)

from agent.session import open_session  # noqa: E402
from agent.workspace import Workspace  # noqa: E402
from editors.arch import layers_of  # noqa: E402
from editors.stats import default_corpus  # noqa: E402
from evaluators.specificity import Probe, generate_answers  # noqa: E402


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    return (torch.tensor([q + [0] * (width - len(q)) for q in seqs]),
            torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs]))


def last_logp(model, tok, texts: list[str]) -> torch.Tensor:
    """(n, V) next-token log-probabilities after each text."""
    ids = tok(texts).input_ids
    x, m = padded(ids)
    logits = model(input_ids=x, attention_mask=m).logits
    return logits[torch.arange(len(ids)), torch.tensor([len(q) - 1 for q in ids])].log_softmax(-1)


def step_loss(model, tok, batch, keep: list[str], keep_lp, wiki: list[list[int]], wiki_lp, kl_weight: float):
    pos, bk, bw = batch
    seqs = [p + t for p, t in pos]
    x, m = padded(seqs)
    logits = model(input_ids=x, attention_mask=m).logits
    ce = torch.stack([F.cross_entropy(logits[j, len(p) - 1: len(p) + len(t) - 1], torch.tensor(t))
                      for j, (p, t) in enumerate(pos)]).mean()
    kl_keep = F.kl_div(last_logp(model, tok, [keep[i] for i in bk]), keep_lp[bk], log_target=True,
                       reduction="batchmean")
    lw = model(input_ids=torch.tensor([wiki[i] for i in bw])).logits.log_softmax(-1)
    kl_wiki = F.kl_div(lw.flatten(0, 1), wiki_lp[bw].flatten(0, 1), log_target=True, reduction="batchmean")
    return ce + kl_weight * (kl_keep + kl_wiki), (ce.item(), kl_keep.item(), kl_wiki.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layers", type=int, nargs=2, default=[12, 20], help="first and last block whose MLP is trained")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    root = a.workspace.resolve()
    session = open_session(Workspace(root))
    model, tok, memory = session.model, session.tok, session.editor.memory
    facts = session.ledger.facts(status="applied")
    neighbours = [n["prompt"] for line in open(root.parent / "feed.jsonl") for n in json.loads(line).get("neighbors", [])]
    pos, neg, others = prompts(session, facts)
    pos_ids = [(tok(p).input_ids, tok(" " + t, add_special_tokens=False).input_ids) for p, _, t in pos
               if "<|im_start|>" not in p]
    keep = neg + others
    ids = tok(default_corpus()[:200_000]).input_ids[: 64 * 64]
    wiki = [ids[i: i + 64] for i in range(0, len(ids), 64)]
    with memory.suspended(), torch.no_grad():
        base = [x.text for x in generate_answers(model, tok, [Probe(p, 5) for p in neighbours])]
        keep_lp = torch.cat([last_logp(model, tok, keep[i: i + 64]) for i in range(0, len(keep), 64)])
        wiki_lp = torch.cat([model(input_ids=torch.tensor(wiki[i: i + 8])).logits.log_softmax(-1)
                             for i in range(0, len(wiki), 8)])
    params = [p for layer in range(a.layers[0], a.layers[1] + 1) for p in layers_of(model)[layer].mlp.parameters()]
    saved = [p.detach().clone() for p in params]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt, t0 = torch.optim.Adam(params, lr=a.lr), time.perf_counter()
    with memory.suspended(), torch.enable_grad():
        for step in range(a.steps):
            batch = ([pos_ids[i] for i in torch.randint(0, len(pos_ids), (24,)).tolist()],
                     torch.randint(0, len(keep), (24,)).tolist(), torch.randint(0, len(wiki), (2,)).tolist())
            loss, parts = step_loss(model, tok, batch, keep, keep_lp, wiki, wiki_lp, a.kl_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == a.steps - 1:
                print(f"step {step}: ce {parts[0]:.3f}, kl keep {parts[1]:.4f}, kl wiki {parts[2]:.4f}", flush=True)
    for p in params:
        p.requires_grad_(False)
    row = {"design": "distill-logits", "layers": a.layers, "steps": a.steps, "lr": a.lr, "kl_weight": a.kl_weight,
           "seconds": round(time.perf_counter() - t0, 1),
           "update": max(float((p - b).norm() / b.norm()) for p, b in zip(params, saved))}
    print(json.dumps(row | measure(session, facts, neighbours, base)), flush=True)
    session.close()


if __name__ == "__main__":
    main()
