"""Is the asked relation linearly decodable from the prompt's last state at the memory's layer (17)? A logistic
regression over the relation bank's relations (+ descriptions), trained on its TRAIN templates x 10 counterfact-train
subjects per relation, tested on its TEST templates (held-out phrasings) and on other records' rephrase prompts.
Prints one JSON line per weight decay (issue 26: why no key drawn from the bank reaches CounterFact's paraphrases).
`--layer L` reads the states at another block's output instead (is the relation decodable higher up?).

    python scripts/relation_probe.py [--layer 17]
"""
import argparse, json, random, sys, time
from pathlib import Path

import torch
torch.set_num_threads(1)
_ap = argparse.ArgumentParser(description="relation probe at one layer's output")
_ap.add_argument("--layer", type=int, default=17, help="block whose output is read (default: the memory's, 17)")
LAYER = _ap.parse_args().layer

from editors.models import load_model
from editors.entity_memory import last_states
from evaluators.relations import RelationBank, fill
from evaluators.counterfact import load_counterfact
lm = load_model("smollm2-135m"); model, tok = lm.model, lm.tok
bank = RelationBank.load()
recs = load_counterfact(str(Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-train.json"))
by_rel = {}
for r in recs[:4000]:
    rel = bank.resolve(r.template(), r.ground_truth)
    if rel: by_rel.setdefault(rel.id, []).append(r)
rels = [r for r in bank.relations if len(by_rel.get(r, [])) >= 8]
print(len(rels), "relations", file=sys.stderr)
random.seed(0)
def states(texts):
    out = []
    for i in range(0, len(texts), 64):
        out.append(last_states(model, tok, texts[i:i+64], LAYER))
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)
tr_x, tr_y, te_x, te_y, pa_x, pa_y = [], [], [], [], [], []
for ci, rid in enumerate(rels):
    rs = by_rel[rid]; random.shuffle(rs)
    train_s = [r.subject for r in rs[:10]]; test_recs = rs[10:30]
    rel = bank.relation(rid)
    tr_x += [fill(t, s) for t in rel.train for s in train_s]; tr_y += [ci] * (len(rel.train) * len(train_s))
    te_x += [fill(t, r.subject) for t in rel.test for r in test_recs[:6]]; te_y += [ci] * (len(rel.test) * len(test_recs[:6]))
    pa_x += [r.rephrase_prompt for r in test_recs]; pa_y += [ci] * len(test_recs)
# "other": descriptions
kinds = bank.kinds
other = len(rels)
for k in kinds.values():
    subs = [r.subject for rid in k.relations if rid in by_rel for r in by_rel[rid][:5]]
    tr_x += [fill(t, s) for t in k.descriptions["train"] for s in subs]; tr_y += [other] * (len(k.descriptions["train"]) * len(subs))
    te_x += [fill(t, s) for t in k.descriptions["test"] for s in subs]; te_y += [other] * (len(k.descriptions["test"]) * len(subs))
t0 = time.time()
Xtr, Xte, Xpa = states(tr_x), states(te_x), states(pa_x)
print("states", len(tr_x), len(te_x), len(pa_x), round(time.time() - t0, 1), file=sys.stderr)
ytr, yte, ypa = map(torch.tensor, (tr_y, te_y, pa_y))
C = other + 1
for wd in (1e-3, 1e-2):
    W = torch.zeros(Xtr.shape[1], C, requires_grad=True); b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300)
    def closure():
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(Xtr @ W * 10 + b, ytr) + wd * (W ** 2).sum(); loss.backward(); return loss
    opt.step(closure)
    with torch.no_grad():
        acc = lambda X, y: float(((X @ W * 10 + b).argmax(1) == y).float().mean())
        print(json.dumps({"layer": LAYER, "wd": wd, "train": acc(Xtr, ytr), "test_templates": acc(Xte, yte), "rephrase": acc(Xpa, ypa)}), flush=True)

