"""Train the tiny fact model the fast tests edit: a 4-block Llama that knows a few thousand invented facts.

A tiny random model cannot answer any fact, so tests on it can never see an edit that does not take or one that
damages another fact. This script trains, once and on CPU (minutes), a small `LlamaForCausalLM` on synthetic facts -
invented one-word subjects ("Zorbinkel"), 8 relations with 3 prompt templates each (the first is the fact's prompt,
the other two its paraphrases), objects from small sets - mixed with WikiText-2 text of the shipped statistics part
(so held-out perplexity and covariance statistics mean something). The tokenizer is a small BPE trained on the same
text, split on spaces and punctuation (Metaspace): a subject tokenises to the same ids at the start of a text and
after a space, as the entity memory's subject matching needs.

Written to OUT (default tests/assets/tiny_fact_model/): model.safetensors, config.json, generation_config.json,
tokenizer files (with a chat template), facts.json (every fact it was trained on, the templates and object sets),
known_facts.jsonl and probe_facts.jsonl (facts of subjects reserved from tests' edits, in the format of
evaluators/probes/facts.py, for a workspace's `probe_file` / `damage_file`), corpus.txt (text for `--stats-corpus`) and
training_log.json (seed, settings, loss curve, accuracy, seconds).

    python scripts/train_tiny_fact_model.py [--out DIR] [--steps 1600] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editors.corpus import stats_text  # noqa: E402  (scripts run from a checkout)
from evaluators.scoring import greedy_matches, greedy_next_tokens  # noqa: E402

OUT = ROOT / "tests" / "assets" / "tiny_fact_model"

RELATIONS: dict[str, tuple[list[str], list[str]]] = {  # relation -> (templates, objects)
    "birthplace": (["{} was born in", "The birthplace of {} is", "{} is a native of"],
                   ["Velmora", "Tarsk", "Quillon", "Brenhal", "Ostavia", "Lumen", "Karth", "Dovrin", "Elsmere",
                    "Ravik", "Sundar", "Mirrow"]),
    "language": (["The mother tongue of {} is", "{} speaks the language", "{}'s native language is"],
                 ["French", "German", "Spanish", "Italian", "Dutch", "Polish", "Swedish", "Greek"]),
    "profession": (["The profession of {} is", "{} works as a", "{}'s job is"],
                   ["baker", "pilot", "lawyer", "farmer", "doctor", "painter", "teacher", "sailor", "miner",
                    "chemist"]),
    "instrument": (["The instrument of {} is the", "{} plays the", "{}'s instrument is the"],
                   ["piano", "violin", "guitar", "flute", "cello", "drums", "harp", "trumpet"]),
    "employer": (["The employer of {} is", "{} works for", "{} is employed by"],
                 ["Acmetron", "Bluecrest", "Corvane", "Dyntek", "Everfield", "Fennix", "Glowmark", "Halberd",
                  "Ironleaf", "Jadeport"]),
    "sport": (["The favourite sport of {} is", "{} is a fan of", "{}'s sport is"],
              ["tennis", "football", "rugby", "cricket", "hockey", "golf", "boxing", "rowing"]),
    "citizenship": (["The nationality of {} is", "{} is a citizen of", "{} holds a passport from"],
                    ["Norland", "Estavia", "Morvania", "Calderon", "Ybrisia", "Tolmark", "Wendora", "Pellaria",
                     "Zantor", "Ardenne"]),
    "colour": (["The favourite colour of {} is", "{} likes the colour", "{}'s favourite colour is"],
               ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]),
}
DECAY_SHARE = 0.3  # of the steps over which the learning rate decays to 0
PROMPT_WEIGHT = 0.2  # loss weight of a fact sentence's tokens other than its object (the objects are what is learnt)
FACT_WEIGHT = 20  # the fact sentences count this many times in the tokenizer's training text (names merge whole)
SPECIALS = ["<pad>", "<unk>", "<eos>", "<bos>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}\n{% endif %}")
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
          "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "io"]
CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "k"]


@dataclass
class Settings:
    seed: int = 0  # everything random (names, facts, init, batches) derives from it
    subjects: int = 150  # invented one-word subjects
    reserved: int = 20  # subjects whose facts form the probe files (tests edit the others)
    vocab: int = 1536  # BPE vocabulary (room for every subject as one token)
    hidden: int = 64  # d_model
    layers: int = 4  # decoder blocks
    heads: int = 4  # attention heads (2 key/value heads)
    intermediate: int = 256  # MLP width
    seq_len: int = 32  # training window (tokens)
    batch: int = 64  # windows per step
    steps: int = 1600  # optimiser steps
    lr: float = 2e-2  # peak AdamW learning rate (see lr_at)
    wiki_chars: int = 300_000  # characters of the shipped WikiText-2 statistics part mixed in
    wiki_share: float = 0.1  # share of training windows drawn from that text
    log_every: int = 100  # steps between loss-curve points
    eval_every: int = 400  # steps between fact-accuracy checks
    curve: list = field(default_factory=list)  # (step, loss) - filled while training


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).title()


def make_subjects(rng: random.Random, n: int) -> list[str]:
    """n distinct invented names of 2 syllables (each one token of the tokenizer trained on the facts)."""
    names: set[str] = set()
    while len(names) < n:
        names.add(word(rng, 2))
    return rng.sample(sorted(names), n)


def make_facts(rng: random.Random, subjects: list[str]) -> list[dict]:
    facts = []
    for s in subjects:
        for rel, (templates, objects) in RELATIONS.items():
            facts.append({"subject": s, "relation": rel, "prompt": templates[0].format(s),
                          "paraphrases": [t.format(s) for t in templates[1:]], "target": rng.choice(objects)})
    return facts


def sentences(facts: list[dict]) -> list[str]:
    return [f"{p} {f['target']}." for f in facts for p in [f["prompt"], *f["paraphrases"]]]


def build_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="always"),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                                       initial_alphabet=alphabet, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_subjects(tok, subjects: list[str], facts: list[dict]) -> None:
    """Each subject tokenises alike at a text's start, after a space and inside its prompts."""
    for s in subjects:
        alone, spaced = tok(s, add_special_tokens=False).input_ids, tok(" " + s, add_special_tokens=False).input_ids
        assert alone == spaced, (s, alone, spaced)
    for f in facts:
        ids, sub = tok(f["prompt"]).input_ids, tok(f["subject"]).input_ids
        assert any(ids[i:i + len(sub)] == sub for i in range(len(ids))), f


def streams(tok, facts: list[dict], wiki: str) -> tuple[list[tuple[list[int], list[float]]], torch.Tensor]:
    """Each fact sentence as (token ids, loss weights: 1 on the object's tokens, PROMPT_WEIGHT elsewhere), and
    the WikiText part as one token stream."""
    docs = []
    for f in facts:
        answer = len(tok(" " + f["target"], add_special_tokens=False).input_ids)
        for p in [f["prompt"], *f["paraphrases"]]:
            ids = tok(f"{p} {f['target']}.").input_ids
            weights = [PROMPT_WEIGHT] * len(ids)
            weights[-1 - answer:-1] = [1.0] * answer
            docs.append((ids, weights))
    return docs, torch.tensor(tok(wiki).input_ids)


def fact_window(docs, rng: random.Random, n: int) -> tuple[list[int], list[float]]:
    """Random fact sentences back to back (the model learns to answer at a text's start and after other text)."""
    ids: list[int] = []
    weights: list[float] = []
    while len(ids) < n:
        i, w = rng.choice(docs)
        ids, weights = ids + i, weights + w
    return ids[:n], weights[:n]


def batch_of(docs, wiki: torch.Tensor, rng: random.Random, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows, per-token loss weights): WikiText windows (weight 1) and fact windows."""
    rows, weights = [], []
    for _ in range(s.batch):
        if rng.random() < s.wiki_share:
            start = rng.randrange(0, len(wiki) - s.seq_len)
            rows.append(wiki[start:start + s.seq_len].tolist())
            weights.append([1.0] * s.seq_len)
        else:
            ids, w = fact_window(docs, rng, s.seq_len)
            rows.append(ids)
            weights.append(w)
    return torch.tensor(rows), torch.tensor(weights)


def weighted_loss(model, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                            reduction="none")
    return (nll * w[:, 1:].reshape(-1)).sum() / w[:, 1:].sum()


def accuracy(model, tok, facts: list[dict], paraphrases: bool = False) -> float:
    prompts = [p for f in facts for p in (f["paraphrases"] if paraphrases else [f["prompt"]])]
    targets = [f["target"] for f in facts for _ in (f["paraphrases"] if paraphrases else [0])]
    model.eval()
    hits = greedy_matches(model, tok, prompts, targets)
    model.train()
    return float(hits.float().mean())


def subject_use(model, tok, facts: list[dict]) -> dict:
    """Does the answer depend on the subject? Per relation: distinct greedy answers over the subjects, and the
    accuracy of always answering the relation's most common object (what a model ignoring the subject could do)."""
    model.eval()
    out = {}
    for rel in RELATIONS:
        group = [f for f in facts if f["relation"] == rel]
        first = greedy_next_tokens(model, tok, [f["prompt"] for f in group], 1)
        targets = [f["target"] for f in group]
        out[rel] = {"distinct_answers": len({t[0] for t in first}),
                    "majority_baseline": max(targets.count(t) for t in set(targets)) / len(targets)}
    return out


def lr_at(step: int, s: Settings) -> float:
    """Warm-up, then constant (facts are memorised late: a high rate breaks the plateau), then a linear decay over
    the last DECAY_SHARE of the steps."""
    warm, decay = 100, int(s.steps * DECAY_SHARE)
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * min(1.0, (s.steps - step) / decay)


def train(model, docs, wiki, tok, facts, s: Settings) -> list[dict]:
    rng = random.Random(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.98))
    evals, running = [], []
    model.train()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        x, w = batch_of(docs, wiki, rng, s)
        loss = weighted_loss(model, x, w)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % s.log_every == 0:
            s.curve.append((step + 1, round(sum(running) / len(running), 4)))
            running = []
            print(f"step {step + 1}: loss {s.curve[-1][1]}", flush=True)
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            evals.append({"step": step + 1, "accuracy": round(accuracy(model, tok, facts), 4)})
            print(f"step {step + 1}: fact accuracy {evals[-1]['accuracy']}", flush=True)
    return evals


def probe_files(model, tok, facts: list[dict], reserved: set[str], out: Path) -> dict:
    """Known-fact and damage probe sets from the reserved subjects' facts the model answers (prompt and paraphrases)."""
    from evaluators.probes.damage import fact_margins
    from evaluators.probes.facts import KnownFact, ProbeFact

    rows = [(f, src, p) for f in facts if f["subject"] in reserved
            for src, p in [("prompt", f["prompt"]), *(("rephrase", q) for q in f["paraphrases"])]]
    hits = greedy_matches(model, tok, [p for _, _, p in rows], [f["target"] for f, _, _ in rows]).tolist()
    kept = [(i, r) for i, (r, ok) in enumerate(zip(rows, hits)) if ok]
    known = [KnownFact(prompt=p, subject=f["subject"], target=f["target"], case_id=i, source=src)
             for i, (f, src, p) in kept]
    margins = fact_margins(model, tok, known).tolist()
    probes = [ProbeFact(prompt=k.prompt, subject=k.subject, target=k.target, dataset="tiny-facts", record=k.case_id,
                        source=k.source, margin=round(m, 4)) for k, m in zip(known, margins)]
    (out / "known_facts.jsonl").write_text("".join(k.model_dump_json() + "\n" for k in known))
    (out / "probe_facts.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in probes))
    return {"candidates": len(rows), "kept": len(known)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on 2 shared cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = Settings(seed=args.seed, steps=args.steps)
    t0 = time.time()
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    subjects = make_subjects(rng, s.subjects)
    facts = make_facts(rng, subjects)
    wiki = stats_text()[:s.wiki_chars]
    corpus = sentences(facts) * FACT_WEIGHT + wiki.splitlines()
    tok = build_tokenizer(corpus, s.vocab)
    check_subjects(tok, subjects, facts)
    docs, wiki_ids = streams(tok, facts, wiki)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    evals = train(model, docs, wiki_ids, tok, facts, s)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    reserved = set(subjects[-s.reserved:])
    probes = probe_files(model, tok, facts, reserved, args.out)
    (args.out / "corpus.txt").write_text("\n".join(sentences(facts)[::3]) + "\n" + stats_text()[s.wiki_chars:][:200_000])
    (args.out / "facts.json").write_text(json.dumps(
        {"relations": {r: {"templates": t, "objects": o} for r, (t, o) in RELATIONS.items()},
         "subjects": subjects, "reserved_subjects": sorted(reserved), "facts": facts}, indent=1))
    log = {"seed": s.seed, "settings": {k: v for k, v in asdict(s).items() if k != "curve"},
           "parameters": sum(p.numel() for p in model.parameters()), "facts": len(facts),
           "one_token_subjects": sum(len(tok(x).input_ids) == 1 for x in subjects),
           "loss_curve": s.curve, "accuracy_during_training": evals,
           "accuracy": accuracy(model, tok, facts), "paraphrase_accuracy": accuracy(model, tok, facts, True),
           "subject_use": subject_use(model, tok, facts), "probe_files": probes,
           "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "threads": torch.get_num_threads()}
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("accuracy", "paraphrase_accuracy", "parameters", "seconds")}))


if __name__ == "__main__":
    main()
