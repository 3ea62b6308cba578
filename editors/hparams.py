"""Typed editing hyperparameters, and the measured settings the methods' defaults build on.

Each method declares its own defaults on its Editor class (`defaults`); the per-model settings
(family and size: SmolLM2, Llama-3-8B, Qwen2.5-7B, Mistral-7B, GPT-J, GPT2-XL) are the table of
editors/defaults.py, which `editors.registry.hparams_for` resolves. The SmolLM2 sweep that chose the
SmolLM2 values is recorded in BENCHMARKS.md.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EditHParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int]  # edited MLP output layers, ascending; target values live at the last one
    mom2_weight: float = 15000.0  # lambda: weight of the preserved-key covariance C0 in the normal matrix
    alpha: float = 0.0  # Frobenius-norm term alpha*I in the normal matrix (ENCORE); 0 for MEMIT
    lr: float = 0.5  # Adam learning rate of the target-value delta
    max_steps: int = 25  # most optimisation steps per target value
    clamp_factor: float = 0.75  # ||delta|| <= clamp_factor * ||h0||
    kl_factor: float = 0.0625  # weight of KL(new || old) on "{subject} is a"
    memory_site: str = Field("subject", pattern="^(subject|answer)$")  # write="memory": where a slot adds its value -
    #   at the subject's last token of every text naming it ("subject"), or at the prompt's last token, only where that
    #   token's state at the memory's layer is within the slot's radius of its key (the edit's forms), "answer"
    answer_margin: float = Field(0.25, ge=0, le=1)  # memory_site="answer": a key's radius lies this share of the way
    #   from its nearest must-not-fire prompt (the subject's other relations) towards the key
    answer_discriminant: float | None = Field(None, ge=0, le=1)  # memory_site="answer": also key the direction from
    #   the must-not-fire prompts' mean to the forms' mean, firing this share of the way from the highest must-not-fire
    #   prompt to the forms' mean along it (None: per-form keys only)
    answer_recall: bool = False  # memory_site="answer": a slot also fires where the model without the memory would
    #   answer what it answers the edit's prompt with (its old answer, when that names something), whatever the phrasing
    keep_factor: float = 0.0  # weight of the mean KL(new || old) on a request's `keep` prompts (its subject's other
    #   relations and description): what holds the subject's other facts in place
    weight_decay: float = 0.5  # weight of ||delta||^2 / ||h0||^2
    stop: str = Field("nll", pattern="^(nll|mpes)$")  # stopping rule: NLL threshold (MEMIT) or MPES (ENCORE)
    nll_stop: float = 0.05  # "nll" rule: stop an edit once its mean target NLL falls below this
    mpes_patience: int = 1  # "mpes" rule: consecutive checks with every target token most probable
    n_context: int = 5  # context prefixes generated once by the unedited model
    context_tokens: int = 10  # length of each generated prefix
    stats_tokens: int = 100_000  # corpus tokens for the covariance statistics
    nullspace_threshold: float = 1e-2  # AlphaEdit: eigenvalues of C0 below this span the null space
    alphaedit_l2: float = 10.0  # AlphaEdit: ridge term of its normal matrix
    value_chunk: int = 16  # edits optimised in one padded batch (32: same speed, +1.2 GB peak RSS; BENCHMARKS.md)
    write: str = Field("weights", pattern="^(weights|memory)$")  # where values go: a weight solve, or the entity memory
    memory_layer: int | None = Field(None, ge=0)  # write="memory": block whose output the memory adds to and where its values are optimised (None: the last edited layer)
    # --- frontier movers of the weight write (issue 15; BENCHMARKS.md, "frontier movers"); all off by default ---
    values_on: str = Field("current", pattern="^(current|base)$")  # target values optimised on the current or the base weights (NSE)
    nas_factor: float = 0.0  # NAS: v* rescaled to the pilot edits' mean norm, v* above this many times it skipped (0 = off)
    protect_energy: float = 0.0  # SPHERE: updates kept off W0's principal directions holding this share of its energy (0 = off)

    @property
    def value_site(self) -> str:
        """Where a value row's delta sits: at the prompt's end for answer-site memory slots, else at the subject."""
        return self.memory_site if self.write == "memory" else "subject"

    @property
    def value_layer(self) -> int:
        """Where target values are optimised: the entity memory's layer with write="memory", else the last edited."""
        if self.write == "memory" and self.memory_layer is not None:
            return self.memory_layer
        return self.layers[-1]


# llama values measured on SmolLM2-135M (BENCHMARKS.md, "sweep"): lambda 15000 realised only a third
# of the target residual (ES .56 on 16 edits); 3000 realised 69 % (ES 1.0).
SMOLLM2 = {"layers": [3, 4, 5, 6, 7], "mom2_weight": 3000.0}


def scaled_layers(n_layers: int) -> list[int]:
    """MEMIT's choice for GPT-J (layers 3-8 of 28) scaled to another depth: five early-middle layers."""
    first = max(1, round(n_layers * 3 / 28))
    return [i for i in range(first, first + 5) if i < n_layers - 1]
