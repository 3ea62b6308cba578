"""`kagent bench`: sequential editing benchmark on CounterFact or zsRE.

Every method starts from the unedited model and applies the same first N records in the
same order, in batches of B; the final model is evaluated on all N records together with
perplexity, known-fact accuracy and weight-norm growth, and (CounterFact) on a sample of them with the same-subject
specificity and reach per prompt form of evaluators/specificity.py. Each row records the device and dtype it ran on and,
on CUDA, the peak GPU memory of the method's batches; edit timings synchronise CUDA before reading the clock.
"""
from __future__ import annotations

import json
import logging
import random
import resource
import shlex
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from editors.arch import weight_view
from editors.devices import model_devices, peak_gpu_mb, reset_gpu_peak, synchronize
from editors.footprint import Dims, edit_tokens, estimate, peak_mb, reset_peak, resident_mb
from editors.models import DEFAULT_MODEL, dtype_name, load_model
from editors.prompts import EditRequest
from editors.registry import METHODS, make_editor
from editors.user_corpus import UserCorpus
from evaluators import counterfact, zsre
from evaluators.counterfact import harmonic_mean
from evaluators.edit_forms import FormSettings, enrich
from evaluators.monitors import norms
from evaluators.probes.answers import known_fact_accuracy
from evaluators.probes.facts import ZSRE, reserved
from evaluators.probes.perplexity import perplexity
from evaluators.relations import RelationBank
from evaluators.scoring import greedy_matches
from evaluators.specificity import (EditCase, Probe, SpecificityConfig, ask, build_plan, contains, generate_answers,
                                    score)
from memory.planner import Order, plan

log = logging.getLogger(__name__)


class Variant(BaseModel):
    """One row of the bench: a method under its own settings, e.g. a frontier mover of the weight write."""
    model_config = ConfigDict(extra="forbid")

    name: str  # the row's label
    method: str = "encore"  # registered editor
    overrides: dict = {}  # hyperparameters over the bench's --set ones
    order: Order | None = None  # batch order (None: the bench's)
    consolidate_every: int | None = None  # joint re-solve every K batches (None: the bench's)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """`NAME: KEY=VALUE ...` (JSON values; `method`, `order` and `consolidate_every` set the row's own)."""
        name, sep, rest = text.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"{text!r}: a variant is 'NAME: KEY=VALUE ...'")
        try:
            pairs = assignments(shlex.split(rest))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        own = {k: pairs.pop(k) for k in ("method", "order", "consolidate_every") if k in pairs}
        return cls(name=name.strip(), overrides=pairs, **own)


def assignments(pairs) -> dict:
    """`KEY=VALUE` strings as a dict; a value that parses as JSON is taken as JSON, else as the string."""
    out: dict = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    facts: Path  # CounterFact or zsRE JSON file
    format: Literal["counterfact", "zsre"] = "counterfact"  # schema of `facts`
    start: int = 0  # first record edited (e.g. 5000 for records nobody tuned on)
    n: int = 100  # records start..start+N-1 are edited
    batch_size: int = 100  # edits per batch
    methods: list[str] = Field(default_factory=METHODS.names)  # each from the unedited model
    model: str = DEFAULT_MODEL  # alias, local dir or hub name
    device: str | None = None  # None = CUDA when available
    dtype: str = "auto"  # model dtype: auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    device_map: str | None = None  # "auto": spread the model over the visible GPUs (accelerate)
    stats_corpus: Path | None = None  # text/JSONL file or directory for the covariance statistics (None: shipped)
    order: Order = "arrival"  # batch order (cluster/spread: FAISS k-means clusters together/apart)
    ppl_tokens: int = 4096  # held-out tokens for perplexity
    overrides: dict = {}  # hyperparameter overrides for every method
    consolidate_every: int = 0  # re-solve all edits jointly from the base weights every K batches (0 = never)
    variants: list[Variant] = []  # further rows after `methods`; values_on="base" rows share their target values
    specificity_n: int = 200  # edited records sampled for specificity and reach (CounterFact; 0 = not measured)
    known_only: bool = False  # CounterFact: edit only records whose true answer the unedited model's greedy answer
    #   to the edit prompt contains (`known`), the n after `start` of them: what "preserve what it knew" is about
    case_ids: list[int] | None = None  # CounterFact: edit exactly these records (run_bench resolves known_only to
    #   them once, so that every row edits the same records without asking the unedited model again)
    forms: bool = True  # CounterFact edits trained on their other forms with the subject's other relations held, as
    #   the agent trains them (evaluators/edit_forms.py); the record's rephrase prompt is not trained on (it is measured)


class MethodResult(BaseModel):
    method: str  # editor, or "unedited"
    model: str  # model name
    n: int  # records edited and evaluated
    batch_size: int  # edits per batch
    order: str  # batch order
    es: float  # efficacy (CounterFact) / edit token accuracy (zsRE)
    ps: float  # paraphrase success / rephrase token accuracy
    greedy_es: float  # share of edit prompts whose greedy continuation begins with the target (what users see)
    greedy_ps: float  # the same on the paraphrase / rephrase prompts
    ns: float  # neighbourhood kept / locality
    score: float  # harmonic mean of es, ps, ns
    ppl_before: float  # held-out perplexity of the unedited model
    ppl_after: float  # ... after all edits
    known_acc_before: float  # known-fact probe accuracy, unedited
    known_acc_after: float  # ... after all edits
    norm_growth: float  # max over edited layers of ||W_t|| / ||W_0||
    edit_seconds: float  # keys + values + solves + applying, all batches
    edits_per_second: float  # n / edit_seconds
    value_seconds: float  # of which target-value optimisation
    value_gflops: float  # achieved matmul GFLOP/s of the value optimisation
    mean_steps: float  # mean optimisation checks per edit
    consolidations: int = 0  # joint re-solves from the base weights (their time is in edit_seconds)
    peak_rss_mb: float  # process peak resident memory so far
    shared_values: bool = False  # target values reused from an earlier row of this run (not in edit_seconds)
    ram_estimate_mb: float = 0.0  # largest estimated peak RAM of a batch: resident before it + editors.footprint
    # estimate (`mem_estimate_mb` in the older bench JSON under docs/runs/, which no code reads back)
    edit_peak_rss_mb: float = 0.0  # measured peak RSS while this method's batches ran (VmHWM reset before them)
    device: str = "cpu"  # where the model ran ("cuda:0", "cpu"; several joined by "," under a device map)
    dtype: str = "float32"  # the model's dtype
    peak_gpu_mb: float | None = None  # peak allocated CUDA memory of the method's batches (None without CUDA)
    specificity_all: float | None = None  # same-subject statements unchanged (evaluators/specificity.py)
    specificity_sure: float | None = None  # ... of those the unedited model is sure of (first token p >= .3)
    neighbours_unchanged: float | None = None  # locality prompts whose greedy answer is unchanged
    reach_edit: float | None = None  # share of edit prompts whose greedy answer contains the new target
    reach_paraphrase: float | None = None  # ... of paraphrase prompts
    reach_phrasing: float | None = None  # ... of the relation's held-out (test) template about the subject
    reach_question: float | None = None  # ... of "Q: <question>\nA:" prompts
    reach_chat: float | None = None  # ... of the question in the model's chat template
    reach_lower: float | None = None  # ... of edit prompts with the subject lower-cased
    native_edit: float | None = None  # share of edit prompts the unedited model answers with the true fact
    native_paraphrase: float | None = None  # ... paraphrase prompts
    native_phrasing: float | None = None  # ... held-out phrasing prompts
    native_question: float | None = None  # ... question prompts
    native_chat: float | None = None  # ... chat-template prompts
    native_lower: float | None = None  # ... lower-cased prompts
    hparams: dict = {}  # the editor's hyperparameters


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edit_set(records: list, n: int, fmt: str, path: Path) -> list:
    """The first `n` records that hold none of the guard's probe facts (evaluators.probes.facts.reserved):
    CounterFact by case id, the shipped zsRE file by position."""
    if fmt == "counterfact":
        held = reserved("counterfact")
        kept = [r for r in records if r.case_id not in held]
    else:
        held = reserved(ZSRE) if Path(path).stem == ZSRE else set()
        kept = [r for i, r in enumerate(records) if i not in held]
    if len(kept) < len(records):
        log.info("left out %d %s records that hold probe facts", len(records) - len(kept), fmt)
    return kept[:n]


def known(model, tok, records: list, tokens: int = 8) -> list:
    """The CounterFact records whose true answer the unedited model's greedy answer (`tokens` new tokens) to the edit
    prompt contains as whole words: the rule of the measure's native reach, so that it is 1.0 on them."""
    answers = generate_answers(model, tok, [Probe(r.prompt, tokens) for r in records])
    hits = [contains(a.text, r.ground_truth) for a, r in zip(answers, records)]
    log.info("%d of %d records are known to the unedited model", sum(hits), len(records))
    return [r for r, h in zip(records, hits) if h]


def with_forms(records: list, requests: list[EditRequest], tok) -> list[EditRequest]:
    """CounterFact requests with the forms and keep prompts the agent gives a fact (no paraphrases: PS measures
    the record's rephrase prompt)."""
    bank = RelationBank.load()
    out = []
    for rec, req in zip(records, requests):
        relation = bank.resolve(rec.template(), rec.ground_truth)
        out.append(enrich(req, bank, tok, FormSettings(), relation.id if relation else None))
    return out


class _Task:
    """Records, requests and metrics of one data set format."""

    def __init__(self, cfg: BenchConfig, model, tok):
        self.cfg = cfg
        end = cfg.start + cfg.n
        if cfg.format == "counterfact":
            records = counterfact.load_counterfact(cfg.facts)
            if cfg.case_ids is not None:
                by_id = {r.case_id: r for r in records}
                self.records = [by_id[i] for i in cfg.case_ids]
            else:
                pool = edit_set(records, len(records) if cfg.known_only else end, "counterfact", cfg.facts)
                self.records = (known(model, tok, pool) if cfg.known_only else pool)[cfg.start: end]
            self.requests = counterfact.to_requests(self.records)
            if cfg.forms:
                self.requests = with_forms(self.records, self.requests, tok)
            self.prompts = ([r.prompt for r in self.records], [r.rephrase_prompt for r in self.records])
            self.spec = specificity_plan(self.records, cfg.specificity_n, tok)
        else:
            self.spec = None
            edits = zsre.to_requests(edit_set(zsre.load_zsre(cfg.facts), end, "zsre", cfg.facts)[cfg.start:])
            self.records, self.requests = edits.records, edits.requests
            self.pre_loc = zsre.locality_predictions(model, tok, self.records)
            self.prompts = ([r.src for r in self.records], [r.rephrase for r in self.records])

    def evaluate(self, model, tok) -> dict[str, float]:
        """es, ps, ns and greedy_es, greedy_ps of the model as it is."""
        if self.cfg.format == "counterfact":
            r = counterfact.evaluate_counterfact(model, tok, self.records)
            out = {"es": r.es, "ps": r.ps, "ns": r.ns}
        else:
            z = zsre.evaluate_zsre(model, tok, self.records, self.pre_loc)
            out = {"es": z.edit_acc, "ps": z.rephrase_acc, "ns": z.locality}
        targets = [q.target for q in self.requests]
        edit, para = self.prompts
        hits = greedy_matches(model, tok, edit + para, targets + targets).float()
        return out | {"greedy_es": float(hits[: len(edit)].mean()), "greedy_ps": float(hits[len(edit):].mean())}

    def ask_specificity(self, model, tok) -> list | None:
        """The model's answers to the specificity plan's prompts (None without a plan)."""
        return ask(model, tok, self.spec, SpecificityConfig()) if self.spec else None

    def specificity(self, before: list | None, after: list | None) -> dict:
        """The specificity and reach fields of a row from unedited and edited answers ({} without a plan)."""
        if not self.spec or before is None or after is None:
            return {}
        summary = score(self.spec, before, after, SpecificityConfig()).summary()
        return {k: v for k, v in summary.items() if k in MethodResult.model_fields}


def specificity_plan(records: list, n: int, tok):
    """The specificity plan of `n` of the records, sampled with a fixed seed (None when n is 0)."""
    if n <= 0 or not records:
        return None
    picked = sorted(random.Random(0).sample(range(len(records)), min(n, len(records))))
    cases = [EditCase.from_counterfact(records[i]) for i in picked]
    return build_plan(RelationBank.load(), cases, tok, SpecificityConfig())


def batches(requests: list[EditRequest], size: int, order: str) -> list[list[EditRequest]]:
    vectors = None
    if order in ("cluster", "spread"):
        from memory.index import MiniLMEmbedder

        vectors = MiniLMEmbedder().embed([r.text() for r in requests])
    return [[requests[i] for i in b] for b in plan(range(len(requests)), vectors, size, order)]


def _row(cfg, method, quality: dict, base: dict, after: dict, n: int, order: str | None = None,
         **extra) -> MethodResult:
    return MethodResult(method=method, model=cfg.model, n=n, batch_size=cfg.batch_size, order=order or cfg.order,
                        **quality, score=harmonic_mean([quality["es"], quality["ps"], quality["ns"]]),
                        ppl_before=base["ppl"],
                        ppl_after=after["ppl"], known_acc_before=base["known"], known_acc_after=after["known"],
                        peak_rss_mb=_peak_rss_mb(), **extra)


def _probes(model, tok, cfg) -> dict:
    return {"ppl": perplexity(model, tok, max_tokens=cfg.ppl_tokens), "known": known_fact_accuracy(model, tok)}


def batch_estimate_mb(lm, editor, batch: list[EditRequest]) -> float:
    """The estimated peak RSS of editing `batch`: resident memory now plus its working memory (editors.footprint)."""
    edits = [edit_tokens(lm.tok, r, editor.state.context_templates, editor.hp) for r in batch]
    return resident_mb() + estimate(Dims.of(lm.model), edits, editor.hp).working_mb


def load(cfg: BenchConfig):
    return load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map)


def placement(model) -> dict:
    """The device(s) and dtype fields of a result row."""
    return {"device": ",".join(str(d) for d in model_devices(model)),
            "dtype": dtype_name(next(model.parameters()).dtype)}


def run_method(cfg: BenchConfig, variant: Variant, base: dict, shared: dict | None = None) -> MethodResult:
    """One row: `variant` applied from the unedited model. `shared` (stamp -> value cache) carries target values
    optimised on the base weights from row to row."""
    lm = load(cfg)
    task = _Task(cfg, lm.model, lm.tok)
    corpus = UserCorpus(cfg.stats_corpus) if cfg.stats_corpus else None
    editor = make_editor(variant.method, lm.model, lm.tok, corpus=corpus, **(cfg.overrides | variant.overrides))
    w0 = norms.snapshot(lm.model, editor.hp.layers)
    editor.base = w0
    reused = False
    if shared is not None and editor.hp.values_on == "base":
        reused = editor.value_stamp() in shared
        editor.value_cache = shared.setdefault(editor.value_stamp(), {})
    order = variant.order or cfg.order
    every = cfg.consolidate_every if variant.consolidate_every is None else variant.consolidate_every
    method = variant.name
    secs = {"total": 0.0, "values": 0.0}
    flops, steps, done, z, consolidations, ram_estimate = 0.0, [], [], [], 0, 0.0
    reset_peak()
    reset_gpu_peak(lm.model)
    with editor.memory.attached(lm.model):
        for i, batch in enumerate(tqdm(batches(task.requests, cfg.batch_size, order), desc=f"{method} batches",
                                       unit="batch")):
            ram_estimate = max(ram_estimate, batch_estimate_mb(lm, editor, batch))
            synchronize(lm.model)
            t = time.perf_counter()
            result = editor.edit(batch, progress=True)
            done, z = done + batch, z + [result.z]
            if every and (i + 1) % every == 0 and editor.hp.write == "weights":
                consolidate(editor, done, torch.cat(z), w0)
                consolidations += 1
            synchronize(lm.model)
            secs["total"] += time.perf_counter() - t
            secs["values"] += result.seconds["values"]
            flops += result.flops
            steps += result.steps
        edit_peak, gpu_peak = peak_mb(), peak_gpu_mb(lm.model)
        quality = task.evaluate(lm.model, lm.tok)
        after = _probes(lm.model, lm.tok, cfg)
        quality |= task.specificity(base.get("spec"), task.ask_specificity(lm.model, lm.tok))
    return _row(cfg, method, quality, base, after, len(task.records), norm_growth=norms.norm_growth(lm.model, w0),
                ram_estimate_mb=ram_estimate, edit_peak_rss_mb=edit_peak, **placement(lm.model),
                peak_gpu_mb=gpu_peak if torch.cuda.is_available() else None,
                edit_seconds=secs["total"], edits_per_second=len(task.requests) / max(secs["total"], 1e-9),
                value_seconds=secs["values"], value_gflops=flops / max(secs["values"], 1e-9) / 1e9,
                mean_steps=sum(steps) / max(len(steps), 1), consolidations=consolidations, order=order,
                shared_values=reused, hparams=editor.hp.model_dump())


def consolidate(editor, requests: list[EditRequest], z: torch.Tensor, w0: dict[int, torch.Tensor]) -> None:
    """Replace the stacked batch updates by one joint solve of all `requests` from the base weights `w0`."""
    result = editor.consolidate(requests, z, w0)
    for layer, w in w0.items():
        weight_view(editor.model, layer).copy_(w)
    editor.state.kkt.clear()
    editor.state.n_edits = 0
    editor.apply(result)


def run_bench(cfg: BenchConfig, on_row=None) -> list[MethodResult]:
    """The unedited baseline row, then one row per method and variant; `on_row(rows)` after each (so a long run
    that dies keeps the rows it finished)."""
    torch.manual_seed(0)
    lm = load(cfg)
    task = _Task(cfg, lm.model, lm.tok)
    base = _probes(lm.model, lm.tok, cfg) | {"spec": task.ask_specificity(lm.model, lm.tok)}
    quality = task.evaluate(lm.model, lm.tok) | task.specificity(base["spec"], base["spec"])
    if cfg.known_only and cfg.format == "counterfact":
        cfg = cfg.model_copy(update={"case_ids": [r.case_id for r in task.records]})
    rows = [_row(cfg, "unedited", quality, base, base, len(task.records), norm_growth=1.0, edit_seconds=0.0,
                 edits_per_second=0.0,
                 value_seconds=0.0, value_gflops=0.0, mean_steps=0.0, **placement(lm.model))]
    if on_row:
        on_row(rows)
    del lm
    shared: dict = {}
    for variant in [Variant(name=m, method=m) for m in cfg.methods] + cfg.variants:
        rows.append(run_method(cfg, variant, base, shared))
        log.info("%s: %s", variant.name, rows[-1].model_dump(exclude={"hparams"}))
        if on_row:
            on_row(rows)
    return rows


COLUMNS = ["method", "es", "greedy_es", "ps", "greedy_ps", "ns", "score", "ppl_after", "known_acc_after", "norm_growth",
           "edits_per_second", "value_gflops", "mean_steps", "peak_rss_mb", "ram_estimate_mb", "edit_peak_rss_mb"]
SPEC_COLUMNS = ["specificity_all", "specificity_sure", "neighbours_unchanged"] + [
    f"{kind}_{form}" for form in ("edit", "paraphrase", "phrasing", "question", "chat", "lower") for kind in ("reach", "native")]


def table(rows: list[MethodResult]) -> str:
    """A fixed-width text table of the main columns (and the specificity ones a row has)."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    columns = COLUMNS + [c for c in SPEC_COLUMNS if any(getattr(r, c) is not None for r in rows)]
    cells = [columns] + [[fmt(getattr(r, c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
