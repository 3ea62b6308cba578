"""Tune how an edit changes one fact, on counterfact-train records the model knows (issue 26's tuning set).

Picks the first `--n` records (one per subject) among the first `--pool` of `--file` whose relation the bank knows and
whose true answer the unedited model gives first, edits them in batches of 16 with ENCORE (`--set KEY=JSON` over its
hyperparameters; `--plain`: the edit prompt alone, no forms or keep prompts), and prints one JSON line: specificity
(all / sure) on the bank's test statements about each subject, and per form [reach of the new target, native reach
of the true one]. Final figures come from `kagent bench` on counterfact-val, not from this script.

    python scripts/one_fact_tune.py --n 24 --pool 1000 --set memory_site='"answer"'
    python scripts/one_fact_tune.py --n 24 --pool 1000 --ungated      # + the reach with no gate at all
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from editors.models import load_model
from editors.registry import make_editor
from editors.prompts import EditRequest
from evaluators.relations import RelationBank, fill, QUESTION_FORMAT
from evaluators.edit_forms import enrich, FormSettings, chat_template
from evaluators.scoring import greedy_next_tokens, greedy_matches
from evaluators.counterfact import load_counterfact

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=32)
ap.add_argument("--start", type=int, default=0)
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--forms", default="")  # FormSettings overrides k=v,...
ap.add_argument("--plain", action="store_true")
ap.add_argument("--pool", type=int, default=200)
ap.add_argument("--ungated", action="store_true", help="also measure with every answer-site slot firing at every "
                "prompt end that names its subject (radii lowered): the reach a perfect gate could give")
ap.add_argument("--file", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/counterfact/counterfact-train.json"))
a = ap.parse_args()
torch.set_num_threads(1)
lm = load_model("smollm2-135m"); model, tok = lm.model, lm.tok
bank = RelationBank.load()
recs = load_counterfact(a.file)[a.start:]
def word(s):
    m = re.findall(r"[A-Za-z0-9]+", s); return m[0].lower() if m else ""
# pick records the model knows and whose relation resolves
cands = []
for r in recs[:a.pool]:
    rel = bank.resolve(r.template(), r.ground_truth)
    if rel: cands.append((r, rel))
hits = greedy_matches(model, tok, [r.prompt for r, _ in cands], [r.ground_truth for r, _ in cands], first_token_only=True)
known = [c for c, h in zip(cands, hits) if h]
# one record per subject
seen=set(); sel=[]
for r, rel in known:
    if r.subject in seen: continue
    seen.add(r.subject); sel.append((r, rel))
sel = sel[:a.n]
print("records", len(sel), time.time(), file=sys.stderr, flush=True)
over = {}
for kv in a.set:
    k, v = kv.split("="); over[k] = json.loads(v)
fs = FormSettings(**{k: int(v) if v.isdigit() else (v == "True") for k, v in (x.split("=") for x in a.forms.split(",") if x)})
editor = make_editor("encore", model, tok, write="memory", **over)
reqs = []
for r, rel in sel:
    req = EditRequest(r.template(), r.subject, r.target_new)
    if not a.plain:
        req = enrich(req, bank, tok, fs, rel.id)
    reqs.append(req)
print("rows per req", 1 + len(editor.state.context_templates) + len(reqs[0].forms), "kl", 1 + len(reqs[0].keep), file=sys.stderr)
# statements (test split) and forms for the measure
from evaluators.specificity import generate_answers, Probe, answer_key
def gen(prompts, n, chat=False):
    return [x.text for x in generate_answers(model, tok, [Probe(p, n, chat) for p in prompts])]
stmts = [(i, s) for i, (r, rel) in enumerate(sel) for s in bank.statements(r.subject, rel.id, "test")]
forms = {}
for i, (r, rel) in enumerate(sel):
    q = fill(rel.question, r.subject)
    forms.setdefault("edit", []).append((i, r.prompt))
    forms.setdefault("para", []).append((i, r.rephrase_prompt)) if r.rephrase_prompt else None
    held = [t for t in rel.templates("test") if t.strip() != r.template().strip()]
    if held:
        forms.setdefault("phrasing", []).append((i, fill(held[0], r.subject)))
    forms.setdefault("question", []).append((i, QUESTION_FORMAT.format(question=q)))
    forms.setdefault("chat", []).append((i, tok.apply_chat_template([{"role":"user","content":q}], add_generation_prompt=True, tokenize=False)))
    if r.subject.lower() != r.subject:
        forms.setdefault("lower", []).append((i, fill(r.template(), r.subject.lower())))
def measure():
    out = {}
    sp = [s.prompt for _, s in stmts]
    ans = gen(sp, 4)
    # first-token prob for "sure"
    for f, lst in forms.items():
        n = 24 if f in ("chat", "question") else 8
        ans_f = gen([p for _, p in lst], n, f == "chat")
        out[f] = ans_f
    return ans, out
with torch.no_grad():
    base_stmt, base_forms = measure()
    # sureness
    from evaluators.scoring import hidden_states, logits_at, _pad, pad_id_of
    sure = []
    ids = tok([s.prompt for _, s in stmts]).input_ids
    for k in range(0, len(ids), 64):
        chunk = ids[k:k+64]
        x, m = _pad(chunk, pad_id_of(tok), "cpu")
        h = hidden_states(model, x, m)
        lg = logits_at(model, h, torch.arange(len(chunk)), m.sum(1)-1)
        sure += lg.softmax(-1).max(-1).values.tolist()
t = time.time()
with editor.memory.attached(model):
    for k in range(0, len(reqs), 16):
        editor.edit(reqs[k:k+16])
    secs = time.time() - t
    with torch.no_grad():
        ed_stmt, ed_forms = measure()
def contains(a, t): return re.search(r"\b" + re.escape(t.lower()) + r"\b", a.lower()) is not None
same = [answer_key(a) == answer_key(b) for a, b in zip(base_stmt, ed_stmt)]
same_sure = [s for s, p in zip(same, sure) if p >= .3]
res = {"n": len(sel), "secs": round(secs, 1), "spec_all": round(sum(same)/len(same), 3), "spec_sure": round(sum(same_sure)/max(1,len(same_sure)), 3), "n_stmt": len(same), "n_sure": len(same_sure)}
for f, lst in forms.items():
    reach = sum(contains(a, sel[i][0].target_new) for (i, _), a in zip(lst, ed_forms[f])) / len(lst)
    native = sum(contains(a, sel[i][0].ground_truth) for (i, _), a in zip(lst, base_forms[f])) / len(lst)
    res[f] = (round(reach, 3), round(native, 3))
print(json.dumps({"set": a.set, "forms": a.forms, "plain": a.plain, **res}), flush=True)
if a.ungated:
    for s, (k, r) in list(editor.memory.keys.items()):
        editor.memory.keys[s] = (k, r - 10)
    with editor.memory.attached(model), torch.no_grad():
        ed_stmt, ed_forms = measure()
    same = [answer_key(x) == answer_key(y) for x, y in zip(base_stmt, ed_stmt)]
    same_sure = [s for s, p in zip(same, sure) if p >= .3]
    ungated = {"ungated": True, "spec_all": round(sum(same) / len(same), 3),
               "spec_sure": round(sum(same_sure) / max(1, len(same_sure)), 3)}
    ungated |= {f: round(sum(contains(x, sel[i][0].target_new) for (i, _), x in zip(lst, ed_forms[f])) / len(lst), 3)
                for f, lst in forms.items()}
    print(json.dumps(ungated), flush=True)
# show some changed statements
bad = [(stmts[k][1].prompt, base_stmt[k], ed_stmt[k]) for k in range(len(same)) if not same[k] and sure[k] >= .3][:8]
for b in bad: print("  CHANGED", b, file=sys.stderr)
