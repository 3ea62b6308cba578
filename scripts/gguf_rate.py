"""How often the weights tier answers, in plain transformers (HF export) and in llama.cpp (GGUF export).

    kagent export runs/hf --workspace WS && kagent export runs/gguf --format gguf --workspace WS
    python scripts/gguf_rate.py --hf runs/hf --gguf runs/gguf --json runs/gguf_rate.json

Every applied fact of the manifest is asked greedily (6 new tokens) with `from_pretrained` + `generate` and with
`llama_cpp.Llama` on `model.gguf` (temperature 0, the GGUF's own tokenizer); a fact answers when the continuation
begins with " " + its target. Prints the rates over the weights-tier facts and over all applied facts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def plain_answers(hf: Path, prompts: list[str], n_tokens: int) -> list[str]:
    model, tok = AutoModelForCausalLM.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    return out


def llama_answers(gguf: Path, prompts: list[str], n_tokens: int, threads: int) -> list[str]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=threads, verbose=False)
    return [llm(p, max_tokens=n_tokens, temperature=0.0)["choices"][0]["text"] for p in prompts]


def rate(facts: list[dict], answers: dict[str, str]) -> float | None:
    return sum(answers[f["text"]].startswith(" " + f["target"]) for f in facts) / len(facts) if facts else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gguf_rate.py", description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, required=True, help="directory of `kagent export`")
    ap.add_argument("--gguf", type=Path, required=True, help="directory of `kagent export --format gguf`")
    ap.add_argument("--tokens", type=int, default=6, help="new tokens per answer")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    facts = json.loads((args.hf / "manifest.json").read_text())["facts"]
    weights = [f for f in facts if f["tier"] == "weights"]
    prompts = [f["text"] for f in facts]
    t0 = time.perf_counter()
    plain = dict(zip(prompts, plain_answers(args.hf, prompts, args.tokens)))
    t1 = time.perf_counter()
    cpp = dict(zip(prompts, llama_answers(args.gguf / "model.gguf", prompts, args.tokens, args.threads)))
    t2 = time.perf_counter()
    out = {"facts": len(facts), "weights_tier": len(weights),
           "transformers_weights_rate": rate(weights, plain), "llama_cpp_weights_rate": rate(weights, cpp),
           "transformers_all_rate": rate(facts, plain), "llama_cpp_all_rate": rate(facts, cpp),
           "agree": sum(plain[p].strip()[:20] == cpp[p].strip()[:20] for p in prompts) / max(len(prompts), 1),
           "transformers_seconds": t1 - t0, "llama_cpp_seconds": t2 - t1}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
