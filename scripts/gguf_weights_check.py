"""N facts of a feed solved jointly into the weights by ENCORE from the base weights (what a compaction writes), exported
as an HF checkpoint and as GGUF by kagent's exporter, each fact asked greedily in transformers and in llama.cpp.

    python scripts/gguf_weights_check.py WORKSPACE N OUT_DIR FEED

WORKSPACE: an initialised workspace of the embedded model (its statistics and settings are used; its ledger is not
written). Prints each answer pair and {"n", "transformers", "llama_cpp", "both"} (facts answered)."""
import json, sys, time, torch
from pathlib import Path
from agent.workspace import Workspace
from agent.session import open_session
from memory.gguf_export import export_gguf
from editors.models import source_gguf
from memory.export import without_gguf_marker
from memory.record import FactRecord
ws = Workspace.open(Path(sys.argv[1])); n = int(sys.argv[2]); out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
recs = [FactRecord.model_validate_json(l) for l in Path(sys.argv[4]).read_text().splitlines()[:n]]
s = open_session(ws)
t = time.time()
with s.editor.overriding(write="weights"):
    res = s.editor.rebase([r.to_request() for r in recs], s.w0)
print("solve seconds", round(time.time() - t, 1), flush=True)
res.delta.apply(s.model)
with s.editor.memory.suspended(), torch.no_grad():
    from evaluators.scoring import greedy_answers
    plain = greedy_answers(s.model, s.tok, [r.text for r in recs], 6)
with without_gguf_marker(s.model):
    s.model.save_pretrained(out / "hf")
s.tok.save_pretrained(out / "hf")
print("replaced", export_gguf(s.model, s.layers, source_gguf(s.cfg.model), out / "model.gguf"), flush=True)
import llama_cpp
llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, n_threads=2, verbose=False)
cpp = [llm(r.text, max_tokens=6, temperature=0.0)["choices"][0]["text"] for r in recs]
hit_t = [a.startswith(" " + r.target) for a, r in zip(plain, recs)]
hit_c = [a.startswith(" " + r.target) for a, r in zip(cpp, recs)]
for r, a, b in zip(recs, plain, cpp):
    print(repr(r.text), r.target, "| transformers:", repr(a), "| llama.cpp:", repr(b))
print(json.dumps({"n": n, "transformers": sum(hit_t), "llama_cpp": sum(hit_c), "both": sum(x and y for x, y in zip(hit_t, hit_c))}))
s.close()
