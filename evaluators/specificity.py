"""What an edit changes besides its fact: same-subject specificity, reach per prompt form, neighbours.

Given edit records and two states of the model (unedited, edited: each a callable that returns a context manager,
e.g. `contextlib.nullcontext` and `lambda: memory.attached(model)`; how the edits are made is not this module's
business), every prompt is answered greedily in both states (`model.generate`, batched, left-padded, KV cache;
`SpecificityConfig.short_tokens` new tokens after statements and completion forms, `long_tokens` after the
question and chat forms) and compared:

- `specificity_all`: over every (edited subject, statement about it for another relation of its kind from the
  bank's TEST templates, or a TEST description "{} is a"), the share whose edited answer equals the unedited one;
- `specificity_sure`: the same over the statements whose unedited first answer token has p >= `sure_p` (.3);
- `reach[form]`: the share of prompts of that form whose edited answer contains the new target, next to
  `native[form]`: the share whose unedited answer contains the true fact (ground truth), and `ratio` = reach/native;
- `neighbours_unchanged`: the share of neighbour prompts (other subjects; CounterFact's locality prompt) whose
  edited answer equals the unedited one.

"Equals" compares `answer_key`s: the answer's words (letters and digits; punctuation and underscores split words)
with leading articles ("the", "a", "an") and punctuation dropped, its first word plus the capitalised words right
after it (at most 3: "New York City"), case-folded. " Paris, France" and " paris." are equal; " the Euro" and
" the Dollar" differ. "Contains" is a case-insensitive match of the whole target between word boundaries.

Forms and the bank: `evaluators.relations` (the "question" form is "Q: <question>\\nA:").
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field

import torch

from editors.arch import layers_of
from editors.forward import output_tensor
from editors.hooks import forward_hook
from evaluators.relations import RelationBank, Statement, form_name
from evaluators.scoring import model_device, pad_id_of

LONG_FORMS = ("question", "chat")  # forms answered with `long_tokens`
ARTICLES = {"the", "a", "an"}


@dataclass
class SpecificityConfig:
    split: str = "test"  # bank templates asked ("test": the measure's own; "train" only to inspect)
    per_relation: int | None = 1  # templates asked per other relation (and descriptions); None: all of the split
    short_tokens: int = 8  # new tokens after statements, neighbours and completion forms
    long_tokens: int = 24  # new tokens after the question and chat forms
    sure_p: float = 0.3  # a statement is "sure" when the unedited first answer token has at least this probability
    batch_size: int = 32  # prompts per generate call


@dataclass
class EditCase:
    subject: str  # the edited entity, verbatim in the template's "{}"
    template: str  # the edit prompt with "{}" for the subject
    target_new: str  # the new answer
    ground_truth: str | None = None  # the true answer before the edit (native reach), when known
    relation: str | None = None  # relation id; None: `RelationBank.resolve(template, ground_truth)`
    paraphrases: tuple[str, ...] = ()  # other prompts for the same fact
    aliases: tuple[str, ...] = ()  # other names of the subject
    neighbours: tuple[tuple[str, str], ...] = ()  # (prompt, answer) about other subjects

    @classmethod
    def from_counterfact(cls, rec) -> "EditCase":
        """From an `evaluators.counterfact.CounterFactRecord`."""
        return cls(rec.subject, rec.template(), rec.target_new, rec.ground_truth, None, (rec.rephrase_prompt,),
                   (), ((rec.locality_prompt, rec.locality_ground_truth),))


@dataclass(frozen=True)
class Probe:
    prompt: str  # text to continue
    tokens: int  # new tokens to generate
    chat: bool = False  # the prompt already holds the chat template's special tokens (none added)


@dataclass(frozen=True)
class Answer:
    text: str  # the greedy continuation, decoded without special tokens
    first_p: float  # probability of its first token
    state: torch.Tensor | None = field(default=None, compare=False, repr=False)  # with `state_layer`: that block's
    #   output at the prompt's last token
    token: int | None = field(default=None, compare=False, repr=False)  # the id of its first token


Generate = Callable[[Sequence[Probe]], list[Answer]]
State = Callable[[], AbstractContextManager]


@dataclass
class Plan:
    """Every prompt asked about each edit: its statements (other relations, descriptions), forms, neighbours."""
    cases: list[EditCase]
    relations: list[str | None]  # resolved relation id per case
    statements: list[list[Statement]]
    forms: list[dict[str, str]]  # form key -> prompt (evaluators.relations.RelationBank.forms)

    def probes(self, cfg: SpecificityConfig) -> list[Probe]:
        """All prompts, per case: statements, forms, neighbours (the order `score` reads the answers in)."""
        out = []
        for case, stmts, forms in zip(self.cases, self.statements, self.forms):
            out += [Probe(s.prompt, cfg.short_tokens) for s in stmts]
            out += [Probe(p, cfg.long_tokens if form_name(k) in LONG_FORMS else cfg.short_tokens, k == "chat")
                    for k, p in forms.items()]
            out += [Probe(p, cfg.short_tokens) for p, _ in case.neighbours]
        return out


@dataclass
class StatementResult:
    prompt: str
    relation: str  # relation id or "description"
    before: str  # unedited answer
    after: str  # edited answer
    p_before: float  # unedited first-token probability
    same: bool  # answer_key(before) == answer_key(after)
    sure: bool  # p_before >= sure_p


@dataclass
class FormResult:
    form: str  # form key ("edit", "paraphrase#2", ...)
    prompt: str
    before: str
    after: str
    native: bool | None  # unedited answer contains the ground truth (None without one)
    reach: bool  # edited answer contains the new target


@dataclass
class NeighbourResult:
    prompt: str
    answer: str  # the record's expected answer (for reference)
    before: str
    after: str
    same: bool


@dataclass
class FactDetail:
    subject: str
    relation: str | None
    target_new: str
    ground_truth: str | None
    statements: list[StatementResult]
    forms: list[FormResult]
    neighbours: list[NeighbourResult]

    @property
    def specificity(self) -> float | None:
        return _share([s.same for s in self.statements])


@dataclass
class SpecificityResult:
    n_facts: int  # edits measured
    n_statements: int  # same-subject statements asked
    n_sure: int  # of which the unedited model is sure
    specificity_all: float | None  # share of statements whose answer is unchanged (None: no statements)
    specificity_sure: float | None  # the same over the sure statements
    neighbours_unchanged: float | None  # share of neighbour prompts unchanged (None: no neighbours)
    reach: dict[str, float]  # form -> share of its prompts whose edited answer contains the new target
    native: dict[str, float]  # form -> share whose unedited answer contains the ground truth
    ratio: dict[str, float | None]  # form -> reach / native (None when native is 0)
    form_counts: dict[str, int]  # form -> prompts
    facts: list[FactDetail] = field(default_factory=list)  # per edit: every prompt with both answers

    def summary(self) -> dict:
        """Flat figures: specificity_all, specificity_sure, neighbours_unchanged, reach_<form>, native_<form>."""
        out = {k: getattr(self, k) for k in ("n_facts", "n_statements", "n_sure", "specificity_all",
                                             "specificity_sure", "neighbours_unchanged")}
        out |= {f"reach_{f}": v for f, v in self.reach.items()} | {f"native_{f}": v for f, v in self.native.items()}
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def answer_key(text: str) -> str:
    """The part of an answer compared for "unchanged" (see the module docstring)."""
    tokens = re.findall(r"[^\W_]+|[^\w\s]|_", text)
    i = 0
    while i < len(tokens) and (tokens[i].casefold() in ARTICLES or not tokens[i][0].isalnum()):
        i += 1
    if i == len(tokens):
        return ""
    key = [tokens[i]]
    for tok in tokens[i + 1: i + 3]:
        if not (tok[0].isalpha() and tok[0].isupper() and key[-1][0].isupper()):
            break
        key.append(tok)
    return " ".join(key).casefold()


def contains(answer: str, target: str | None) -> bool:
    """Does `answer` contain `target` as whole words, case-insensitively?"""
    if not target or not target.strip():
        return False
    return re.search(rf"(?<![^\W_]){re.escape(target.strip())}(?![^\W_])", answer, re.IGNORECASE) is not None


def build_plan(bank: RelationBank, cases: Sequence[EditCase], tok, cfg: SpecificityConfig) -> Plan:
    """The prompts of every case. A case whose relation is unknown gets no statements and no question/chat form."""
    relations, statements, forms = [], [], []
    for case in cases:
        rel = case.relation or _resolved(bank, case)
        others = [r.id for r in bank.candidates(case.template) if r.id != rel]
        relations.append(rel)
        statements.append(bank.statements(case.subject, rel, cfg.split, cfg.per_relation, others) if rel else [])
        forms.append(bank.forms(case.subject, case.template, rel, case.paraphrases, tok, case.aliases))
    return Plan(list(cases), relations, statements, forms)


def _resolved(bank: RelationBank, case: EditCase) -> str | None:
    rel = bank.resolve(case.template, case.ground_truth)
    return rel.id if rel else None


@torch.no_grad()
def generate_answers(model, tok, probes: Sequence[Probe], batch_size: int = 32,
                     state_layer: int | None = None) -> list[Answer]:
    """Greedy answers of `model` to every probe: grouped by (tokens, chat), length-sorted, left-padded batches. With
    `state_layer`, each answer keeps that block's output at its prompt's last token (read in the same pass)."""
    out: list[Answer | None] = [None] * len(probes)
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(probes):
        groups[(p.tokens, p.chat)].append(i)
    for (tokens, chat), idx in groups.items():
        ids = tok([probes[i].prompt for i in idx], add_special_tokens=not chat).input_ids
        order = sorted(range(len(idx)), key=lambda j: len(ids[j]))
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            for j, answer in zip(chunk, _generate_chunk(model, tok, [ids[j] for j in chunk], tokens, state_layer)):
                out[idx[j]] = answer
    return out  # type: ignore[return-value]


def _generate_chunk(model, tok, seqs: list[list[int]], tokens: int, state_layer: int | None = None) -> list[Answer]:
    width, pad = max(len(s) for s in seqs), pad_id_of(tok)
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    device = model_device(model)
    states: list[torch.Tensor] = []
    with _prefill_last_states(model, state_layer, states):
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=tokens,
                             do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                             pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    new = gen.sequences[:, width:]
    first = torch.softmax(gen.logits[0].float(), -1).gather(1, new[:, :1].to(gen.logits[0].device))[:, 0]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    rows = states[0] if states else [None] * len(texts)
    return [Answer(t, float(p), h, int(i)) for t, p, h, i in zip(texts, first.tolist(), rows, new[:, 0].tolist())]


@contextmanager
def _prefill_last_states(model, layer: int | None, into: list[torch.Tensor]) -> Iterator[None]:
    """Record block `layer`'s output at the last position of the first forward call (the left-padded prompts'
    prefill) into `into` (nothing when `layer` is None)."""
    if layer is None:
        yield
        return

    def grab(_m, _a, out):
        if not into:
            into.append(output_tensor(out)[:, -1].detach().float().cpu())

    with forward_hook(layers_of(model)[layer], grab):
        yield


def ask(model, tok, plan: Plan, cfg: SpecificityConfig, generate: Generate | None = None) -> list[Answer]:
    """Every probe of `plan` answered by the model as it is now (or by `generate`, e.g. a fake in tests)."""
    probes = plan.probes(cfg)
    if generate is None:
        return generate_answers(model, tok, probes, cfg.batch_size)
    return generate(probes)


def score(plan: Plan, before: Sequence[Answer], after: Sequence[Answer], cfg: SpecificityConfig) -> SpecificityResult:
    """The figures from the unedited (`before`) and edited (`after`) answers to `plan.probes(cfg)`."""
    if len(before) != len(after) or len(before) != len(plan.probes(cfg)):
        raise ValueError(f"{len(before)} unedited and {len(after)} edited answers for {len(plan.probes(cfg))} prompts")
    facts, pos = [], 0
    for case, rel, stmts, forms in zip(plan.cases, plan.relations, plan.statements, plan.forms):
        b, a = before[pos:], after[pos:]
        s_res = [StatementResult(s.prompt, s.relation, b[i].text, a[i].text, b[i].first_p,
                                 answer_key(b[i].text) == answer_key(a[i].text), b[i].first_p >= cfg.sure_p)
                 for i, s in enumerate(stmts)]
        off = len(stmts)
        f_res = [FormResult(k, p, b[off + i].text, a[off + i].text,
                            contains(b[off + i].text, case.ground_truth) if case.ground_truth else None,
                            contains(a[off + i].text, case.target_new)) for i, (k, p) in enumerate(forms.items())]
        off += len(forms)
        n_res = [NeighbourResult(p, ans, b[off + i].text, a[off + i].text,
                                 answer_key(b[off + i].text) == answer_key(a[off + i].text))
                 for i, (p, ans) in enumerate(case.neighbours)]
        pos += off + len(case.neighbours)
        facts.append(FactDetail(case.subject, rel, case.target_new, case.ground_truth, s_res, f_res, n_res))
    return summarise(facts)


def summarise(facts: list[FactDetail]) -> SpecificityResult:
    """The aggregate figures over per-fact details."""
    stmts = [s for f in facts for s in f.statements]
    sure = [s for s in stmts if s.sure]
    reach, native, counts = defaultdict(list), defaultdict(list), defaultdict(int)
    for f in facts:
        for r in f.forms:
            name = form_name(r.form)
            counts[name] += 1
            reach[name].append(r.reach)
            if r.native is not None:
                native[name].append(r.native)
    reach_share = {k: _share(v) for k, v in reach.items()}
    native_share = {k: _share(v) for k, v in native.items()}
    ratio = {k: (reach_share[k] / native_share[k] if native_share.get(k) else None) for k in reach_share}
    return SpecificityResult(len(facts), len(stmts), len(sure), _share([s.same for s in stmts]),
                             _share([s.same for s in sure]),
                             _share([n.same for f in facts for n in f.neighbours]), reach_share, native_share, ratio,
                             dict(counts), facts)


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def measure(model, tok, cases: Sequence[EditCase], unedited: State, edited: State, bank: RelationBank | None = None,
            cfg: SpecificityConfig | None = None, generate: Generate | None = None) -> SpecificityResult:
    """Ask every prompt of `cases` under `unedited()` and under `edited()` and score the answers."""
    cfg = cfg or SpecificityConfig()
    plan = build_plan(bank or RelationBank.load(), cases, tok, cfg)
    with unedited():
        before = ask(model, tok, plan, cfg, generate)
    with edited():
        after = ask(model, tok, plan, cfg, generate)
    return score(plan, before, after, cfg)
