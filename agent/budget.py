"""A RAM budget for every batch: estimate its peak before computing it, split what would not fit.

The rule: while a batch runs, the process may reach `ram_budget_mb` (config; 0 = a sixth of the machine's RAM,
or of the cgroup's limit, memory.max, when that is lower: about 4 GB on a 24 GiB machine, leaving the rest of it
usable). Before a batch is computed its peak is estimated as the RAM the process holds now (the model with its
memory-mapped weights paged in, the fact index, the embedder: measured, after freed heap is returned to the OS) plus
the largest phase of the batch: the editor's (editors/footprint.py, from its token counts) or the probes every
batch runs once applied (held-out perplexity windows, known facts, superposition whitening) on top of what the
compute leaves behind. Both are calibrated on SmolLM2 in RELIABILITY.md. A batch over the budget is split into
consecutive groups that fit, each applied (and committed) on its own; a fact that does not fit even alone is
quarantined with the estimate and the budget in its reason. Intake limits (agent/limits.py) are chosen so that a
fact at every limit fits alone. On CUDA the batch's working set lives on the GPU, so there the estimate is
counted against the GPU's RAM instead: what this process's tensors hold on the model's GPUs plus the batch, against
`GPU_SHARE` of what those GPUs can still give (torch.cuda.mem_get_info, memory_allocated and memory_reserved).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import AgentConfig
from agent.session import Session
from editors.devices import gpu_ram_mb
from editors.footprint import (Dims, EditTokens, edit_tokens, estimate, mib, page_in, resident_mb, scoring,
                               whitening)
from evaluators.probes.perplexity import LOGIT_ROWS
from evaluators.probes.suite import WINDOW
from evaluators.scoring import DEFAULT_BATCH
from memory.record import StoredFact

BUDGET_SHARE = 6  # the default budget is total RAM / BUDGET_SHARE
PPL_BATCH = 4  # perplexity windows per forward (evaluators.probes.perplexity.perplexity's default batch_size)
KNOWN_WIDTH = 48  # tokens allowed for a known-fact probe prompt and its answer
KEPT_SHARE = 0.5  # of the edit's working RAM the process may still hold when the probes run (RELIABILITY.md)
GPU_SHARE = 0.9  # of the GPU RAM usable when a batch is planned that the batch may take (allocator fragmentation)


def total_ram_mb() -> float:
    """Physical RAM, or the cgroup (v2) limit (memory.max) when it is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return ram
    return min(ram, int(limit) / 2**20) if limit.isdigit() else ram


def budget_mb(cfg: AgentConfig) -> float:
    """The configured budget, or total RAM / BUDGET_SHARE."""
    return cfg.ram_budget_mb or total_ram_mb() / BUDGET_SHARE


def probes_mb(dims: Dims, cfg: AgentConfig) -> float:
    """Peak working RAM of the probes run after every batch (agent/batch.py `measure`), one after another."""
    width = min(WINDOW, cfg.probe_tokens)
    perplexity = scoring(dims, PPL_BATCH, width, min(LOGIT_ROWS, PPL_BATCH * (width - 1)))
    known_rows = min(cfg.probe_facts, DEFAULT_BATCH)
    known = scoring(dims, known_rows, KNOWN_WIDTH, known_rows * KNOWN_WIDTH // 4)
    return mib(dims, max(perplexity, known, whitening(dims)))


@dataclass
class Split:
    """A planned batch divided by the budget."""

    groups: list[list[StoredFact]] = field(default_factory=list)  # each fits the budget
    estimates: list[float] = field(default_factory=list)  # estimated process peak of each group (MiB)
    too_big: list[tuple[StoredFact, str]] = field(default_factory=list)  # (fact, reason): over the budget alone
    limit_mb: float = 0.0  # the most the process (on CUDA: the model's GPUs) may reach while a group runs
    gpu: bool = False  # the estimates and the limit are of the model's GPUs' RAM, not the process's


class RamBudget:
    """Estimates and splits batches of one session's editor against the RAM budget (on CUDA: the GPU's RAM)."""

    def __init__(self, session: Session):
        self.session = session
        self.limit_mb = budget_mb(session.cfg)
        self.dims = Dims.of(session.model)
        self.probes_mb = probes_mb(self.dims, session.cfg)

    def tokens(self, fact: StoredFact) -> EditTokens:
        editor = self.session.editor
        return edit_tokens(self.session.tok, self.session.request(fact), editor.state.context_templates, editor.hp)

    def working_mb(self, edits: list[EditTokens]) -> float:
        """The batch's largest phase: the edit, or the probes on top of what the edit leaves behind."""
        edit = estimate(self.dims, edits, self.session.editor.hp).working_mb
        return max(edit, self.probes_mb + KEPT_SHARE * edit)

    def held(self) -> tuple[float, float, bool]:
        """(MiB held now where the batch's working set will go, the most it may reach there, on a GPU?): the
        model's GPUs on CUDA (`GPU_SHARE` of what they can still give), else the process's RAM against the budget."""
        gpu = gpu_ram_mb(self.session.model)
        if gpu is not None:
            held, usable = gpu
            return held, held + GPU_SHARE * usable, True
        page_in(self.session.model)
        return resident_mb(), self.limit_mb, False

    def split(self, facts: list[StoredFact], alone: bool = False) -> Split:
        """Consecutive groups of `facts` whose estimated peak fits (`alone`: one fact a group)."""
        if not facts:
            return Split()
        resident, limit, gpu = self.held()
        out, group, sizes = Split(limit_mb=limit, gpu=gpu), [], []
        for fact in facts:
            tokens = self.tokens(fact)
            single = resident + self.working_mb([tokens])
            if single > limit:
                out.too_big.append((fact, self._reason(single, resident, limit, gpu)))
                continue
            if group and (alone or resident + self.working_mb(sizes + [tokens]) > limit):
                self._close(out, group, sizes, resident)
                group, sizes = [], []
            group.append(fact)
            sizes.append(tokens)
        if group:
            self._close(out, group, sizes, resident)
        return out

    def _close(self, out: Split, group: list[StoredFact], sizes: list[EditTokens], resident: float) -> None:
        out.groups.append(group)
        out.estimates.append(resident + self.working_mb(sizes))

    def _reason(self, peak: float, resident: float, limit: float, gpu: bool) -> str:
        if gpu:
            return (f"GPU RAM: applying it alone would take the GPU to ~{peak:.0f} MiB ({resident:.0f} held + "
                    f"{peak - resident:.0f} for the batch), over the {limit:.0f} MiB it can reach ({GPU_SHARE:.0%} "
                    "of what the GPU has free)")
        return (f"RAM: applying it alone would take the process to ~{peak:.0f} MiB ({resident:.0f} resident + "
                f"{peak - resident:.0f} for the batch), over the budget of {limit:.0f} MiB "
                "(config key ram_budget_mb)")
