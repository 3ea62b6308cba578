"""Build evaluators/data/relations.json: CounterFact's prompt templates grouped by relation, per-kind descriptions.

CounterFact's reduced schema (EasyEdit) carries no relation id, but its prompts come in ~216 templates (the prompt
with the subject replaced by "{}"), a few per Wikidata relation. `RULES` below is the hand-written table that maps
every template to its relation: ordered regular expressions, the first that matches the whole template wins. A
template that several relations share ("{}, the": an instrument, a sport or a position; "{} is located in": a
region, a country or a continent) maps to its candidate relations; it is never used as a statement of a relation,
and an edit record with it is resolved by its answer (`answer_votes`: how often each answer is the ground truth of
an unambiguous template of each relation, counted on counterfact-train only). A template no rule matches stops the
script with a list of them.

Split: each relation's unambiguous templates are divided deterministically (sha1 of the template text) into
"train" (the value optimiser may draw on them) and "test" (only the measure asks them; at least one per relation,
about a third); the per-kind description templates likewise. Tuning records are counterfact-train (records 0-999
for the value optimisation); final figures come from counterfact-val.json, never tuned on.

    python scripts/build_relation_bank.py [--data ../shared/data/counterfact] [--out evaluators/data/relations.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# id: (short name, subject kind, question template)
RELATIONS = {
    "P36": ("capital", "country", "What is the capital of {}?"),
    "P37": ("official language", "country", "What is the official language of {}?"),
    "P30": ("continent", "place", "Which continent is {} on?"),
    "P17": ("country", "place", "Which country is {} in?"),
    "P131": ("located in", "place", "Where is {} located?"),
    "P190": ("twin city", "place", "What is the twin city of {}?"),
    "P138": ("named after", "place", "What is {} named after?"),
    "P19": ("birthplace", "person", "Where was {} born?"),
    "P20": ("deathplace", "person", "Where did {} die?"),
    "P27": ("citizenship", "person", "Which country is {} a citizen of?"),
    "P103": ("native language", "person", "What is the native language of {}?"),
    "P1412": ("languages spoken", "person", "Which language does {} speak?"),
    "P106": ("occupation", "person", "What is the occupation of {}?"),
    "P108": ("employer", "person", "Which organisation does {} work for?"),
    "P39": ("position held", "person", "What position does {} hold?"),
    "P101": ("field of work", "person", "What field does {} work in?"),
    "P140": ("religion", "person", "What religion does {} follow?"),
    "P937": ("work location", "person", "In which city did {} work?"),
    "P641": ("sport", "athlete", "Which sport does {} play?"),
    "P413": ("position played", "athlete", "Which position does {} play?"),
    "P136": ("genre", "musician", "What genre of music does {} play?"),
    "P1303": ("instrument", "musician", "Which instrument does {} play?"),
    "P264": ("record label", "musician", "Which record label is {} signed to?"),
    "P159": ("headquarters", "organisation", "Where are the headquarters of {}?"),
    "P740": ("formed in", "organisation", "Where was {} founded?"),
    "P127": ("owned by", "organisation", "Who owns {}?"),
    "P463": ("member of", "organisation", "Which organisation is {} a member of?"),
    "P176": ("manufacturer", "product", "Which company makes {}?"),
    "P178": ("developer", "product", "Which company developed {}?"),
    "P449": ("original network", "work", "On which network did {} originally air?"),
    "P364": ("original language", "work", "What is the original language of {}?"),
    "P407": ("language of work", "work", "In which language is {} written?"),
    "P495": ("country of origin", "work", "Which country is {} from?"),
}

# kind: (relations asked about its subjects, description templates)
KINDS = {
    "country": (["P36", "P37", "P30"],
                ["{} is a country in", "{} is a", "{} is known for", "{} is famous for", "The people of {} are"]),
    "place": (["P17", "P131", "P30", "P190", "P138"],
              ["{} is a", "{} is known for", "{} is famous for", "{} is one of the", "The history of {} began"]),
    "person": (["P19", "P20", "P27", "P103", "P1412", "P106", "P108", "P39", "P101", "P140", "P937"],
               ["{} is a", "{} is best known for", "{} is famous for", "{} was a", "{} is known as"]),
    "athlete": (["P641", "P413", "P27", "P19"],
                ["{} is a", "{} is best known for", "{} is famous for", "{} was a", "{} played for"]),
    "musician": (["P136", "P1303", "P264", "P27", "P19"],
                 ["{} is a", "{} is best known for", "{} is famous for", "{} was a", "{} recorded"]),
    "organisation": (["P159", "P740", "P127", "P463", "P17"],
                     ["{} is a", "{} is known for", "{} is one of the", "{} was founded", "{} is an organisation that"]),
    "product": (["P176", "P178", "P127", "P495"],
                ["{} is a", "{} is known for", "{} is a product that", "{} was released", "{} is used for"]),
    "work": (["P449", "P364", "P407", "P495"],
             ["{} is a", "{} is known for", "{} tells the story of", "{} was released", "{} is about"]),
}

# The hand-written table: (regular expression matched against the whole template, relation or candidates).
# Order matters: the first match wins.
RULES: list[tuple[str, str | list[str]]] = [
    (r".*capital.*", "P36"),
    (r".*(official language|law in \{\} declares the language).*|In \{\}, (the language spoken is|they understand)",
     "P37"),
    (r".*continent.*", "P30"),
    (r"\{\} is located in the country of|\{\}, (which is )?located in", "P17"),
    (r"\{\} is located in|\{\} is in|\{\}, in", ["P131", "P17", "P30"]),
    (r".*(can be found in|is within)|The location of \{\} is|Where is \{\}\? It is located in", "P131"),
    (r".*twin city.*", "P190"),
    (r".*(named (after|for)|called after).*", "P138"),
    (r"\{\} (was born in|is native to|was native to|is originally from|was originally from|originated from"
     r"|originates from)", "P19"),
    (r".*(died|expired at|lost their life|passed away|succumbed|life ended).*", "P20"),
    (r".*citizen.*", "P27"),
    (r".*(mother tongue|native speaker|native language|speaker of).*|\{\}, a native", "P103"),
    (r".*(speaks|spoke the language|writes in).*|The language used by \{\} is", "P1412"),
    (r"The original language of \{\} (is|was)|The language of \{\} (is|was)", "P364"),
    (r".*written in", "P407"),
    (r".*(sport|is a professional).*", "P641"),
    (r".*(occupation|profession).*|\{\},? (who )?works as", "P106"),
    (r".*(employed by|works for)|\{\}, of", "P108"),
    (r".*(domain of|expertise|area of work|works in the (area|field) of|specializes in).*", "P101"),
    (r".*(religion|follower of).*", "P140"),
    (r".*(plays the instrument|plays the|performs on the|performing on the|playing the)", "P1303"),
    (r".*(position does|plays as|plays in the position of|who plays the position).*", "P413"),
    (r".*(has the position of|holds the position of|holds the title of|whose position is that of|'s position is)"
     r"|\{\} is a", "P39"),
    (r".*(genre|known for performing).*|What does \{\} play\? They play|\{\}, who plays|\{\} performs", "P136"),
    (r"\{\} plays", ["P136", "P1303", "P641"]),
    (r"\{\}, the", ["P413", "P1303", "P641"]),
    (r".*(label|record company|recorded for|represented by|released by).*", "P264"),
    (r".*(headquarter|based in).*", "P159"),
    (r".*(found employment in|took up work in|used to work in|was employed in|worked in).*", "P937"),
    (r".*(founded in|formed in|started in).*", "P740"),
    (r".*(created in|developed in|formulated in|originated in).*|\{\} (was )?from|\{\}, that was from", "P495"),
    (r"\{\}, from", ["P495", "P127"]),
    (r".*(owned by|owner)|\{\} is from|\{\}, by", "P127"),
    (r".*(produced by|product of|product manufactured by)|\{\},? (is )?created by|\{\} is developed by", "P176"),
    (r".*(developed by|created by)", "P178"),
    (r".*(debut|premiere|originally aired|released on).*", "P449"),
    (r".*(member of|organization of|part of the|affiliated with).*", "P463"),
]


def relation_of(template: str) -> list[str] | None:
    """The relation(s) of a template by the first rule that matches it whole; None when no rule does."""
    for pattern, rel in RULES:
        if re.fullmatch(pattern, template):
            return [rel] if isinstance(rel, str) else list(rel)
    return None


def split(templates: list[str], weight: Counter | None = None, share: float = 1 / 3) -> dict[str, list[str]]:
    """Deterministic train/test split by sha1 of the text: the lowest hashes (at least one) are test. Each part is
    listed most used first (by `weight`, CounterFact's record count; then by text), so "the first test template"
    is the relation's commonest held-out phrasing."""
    ranked = sorted(templates, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    k = max(1, round(len(ranked) * share))
    weight = weight or Counter()
    by_use = lambda ts: sorted(ts, key=lambda t: (-weight[t], t))  # noqa: E731
    return {"train": by_use(ranked[k:]), "test": by_use(ranked[:k])}


def load_templates(data: Path) -> tuple[Counter, dict[str, Counter]]:
    """Template counts over train and val, and per template the ground truths of the train records."""
    counts: Counter = Counter()
    answers: dict[str, Counter] = defaultdict(Counter)
    for name in ("counterfact-train.json", "counterfact-val.json"):
        for rec in json.loads((data / name).read_text(encoding="utf-8")):
            template = rec["prompt"].replace(rec["subject"], "{}", 1)
            counts[template] += 1
            if name == "counterfact-train.json":
                answers[template][rec["ground_truth"]] += 1
    return counts, answers


def build(data: Path) -> dict:
    counts, answers = load_templates(data)
    mapped = {t: relation_of(t) for t in sorted(counts)}
    unmapped = [t for t, r in mapped.items() if r is None]
    if unmapped:
        sys.exit("unmapped templates:\n" + "\n".join(f"  {t!r} ({counts[t]} records)" for t in unmapped))
    votes: dict[str, Counter] = defaultdict(Counter)
    by_rel: dict[str, list[str]] = defaultdict(list)
    for template, rels in mapped.items():
        if len(rels) == 1:
            by_rel[rels[0]].append(template)
            votes[rels[0]].update(answers[template])
    missing = [r for r in RELATIONS if not by_rel[r]]
    if missing:
        sys.exit(f"relations without an unambiguous template: {missing}")
    relations = [{"id": rid, "name": name, "kind": kind, "question": question, **split(by_rel[rid], counts)}
                 for rid, (name, kind, question) in RELATIONS.items()]
    kinds = [{"name": k, "relations": rels, "descriptions": split(desc)} for k, (rels, desc) in KINDS.items()]
    templates = [{"template": t, "relations": rels, "records": counts[t]} for t, rels in mapped.items()]
    shared = sorted({rel for t in templates if len(t["relations"]) > 1 for rel in t["relations"]})
    answer_votes = {rid: dict(sorted(votes[rid].items())) for rid in shared}
    return {"source": "CounterFact (Meng et al., 2022), EasyEdit reduced schema: counterfact-train.json + "
                      "counterfact-val.json templates; answer votes from counterfact-train only",
            "split": "tune on counterfact-train (records 0-999 for value optimisation); report on counterfact-val",
            "relations": relations, "kinds": kinds, "templates": templates, "answer_votes": answer_votes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "counterfact")
    ap.add_argument("--out", type=Path, default=ROOT / "evaluators" / "data" / "relations.json")
    args = ap.parse_args()
    bank = build(args.data)
    args.out.write_text(json.dumps(bank, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    amb = [t for t in bank["templates"] if len(t["relations"]) > 1]
    print(f"{len(bank['templates'])} templates -> {len(bank['relations'])} relations, {len(bank['kinds'])} kinds; "
          f"{len(amb)} shared templates ({sum(t['records'] for t in amb)} records) resolved by answer; wrote {args.out}")
    for rel in bank["relations"]:
        print(f"  {rel['id']:>6} {rel['name']:<18} {rel['kind']:<12} train {len(rel['train'])} test {len(rel['test'])}")


if __name__ == "__main__":
    main()
