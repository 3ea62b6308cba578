"""The workspace configuration: a pydantic model written to and read from `config.toml`.

Each field carries a description; `to_toml` writes it as a comment above the field so the file documents itself.
A key an older kagent wrote under another name (`RENAMED_KEYS`) is read under its new name with a warning, and the
file says the new name once the workspace next saves its config (`to_toml` writes only the fields as named now).
"""
from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomlkit
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from editors.models import DEFAULT_MODEL, DTYPE_CHOICES
from editors.registry import METHODS

log = logging.getLogger(__name__)

# config.toml keys renamed since a kagent version that wrote them: old name -> name now
RENAMED_KEYS = {
    "memory_budget_mb": "ram_budget_mb",  # issue 29: "memory" also names the fact store and the entity memory
}


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid."""


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="model to edit: the embedded alias, a local HF directory or a hub name")
    device: str = Field("auto", description="torch device for the model; 'auto' = CUDA when available, else CPU")
    dtype: str = Field("float32", description=f"model dtype: {', '.join(DTYPE_CHOICES)} (auto: bfloat16 on CUDA, float32 "
                       "elsewhere; `kagent init` writes the one it chose, workspaces made before it were float32)")
    device_map: str = Field("", description="'auto': spread the model over the visible GPUs with accelerate "
                            "(device is then ignored); empty = the whole model on `device`")
    stats_corpus: str = Field("", description="file or directory of text / JSONL the covariance statistics are "
                              "computed on; empty = the shipped WikiText-2 part")
    hparams_file: str = Field("", description="TOML or JSON file of editor hyperparameters for this model "
                              "(over the per-model defaults, under `editor`); empty = the defaults")
    method: str = Field("encore", description=f"editing method: {', '.join(METHODS.names())}")
    layers: list[int] = Field(default_factory=list,
                              description="edited layers; empty = the method's default for the model family")
    stats_tokens: int = Field(0, ge=0, description="corpus tokens for covariance statistics; 0 = the method's default")
    editor: dict[str, Any] = Field(default_factory=dict, description="editor hyperparameter overrides (names of "
                                   "editors.hparams.EditHParams), e.g. { write = \"weights\" } for ENCORE's weight solve")
    batch_size: int = Field(32, ge=1, description="facts applied together in one batch (two value chunks of 16; "
                            "the probes' and checks' seconds per batch are shared by more facts)")
    max_wait: float = Field(30.0, ge=0, description="seconds to wait before applying a partial batch")
    order: Literal["cluster", "arrival", "random", "spread"] = Field(
        "arrival", description="order in which pending facts are batched: arrival (measured best at 1,000 edits, "
        "BENCHMARKS.md), cluster (similar facts together), spread (similar facts apart) or random")
    feeds: list[str] = Field(default_factory=list, description="feed files that `kagent refresh` processes")
    known_acc_drop: float = Field(
        1.0, ge=0, description="max drop of known-fact accuracy below the baseline (absolute, 0-1); 1 = off: the "
        "damage measure guards instead (a flip count over a few dozen facts is mostly noise)")
    damage_z: float = Field(
        3.0, gt=0, description="a batch damages the model when its probe-fact margin drop exceeds the noise floor "
        "(the drop random updates of its size cause) by more than damage_z standard errors")
    damage_tolerance: float = Field(
        0.05, ge=0, description="excess margin drop over the noise floor (logits, mean over probe facts) always "
        "tolerated, however significant")
    damage_draws: int = Field(1, ge=1, description="random updates measured per batch for the noise floor")
    damage_facts: int = Field(0, ge=0, description="probe facts of the damage measure; 0 = all of the set")
    damage_file: str = Field("", description="JSONL of the damage measure's probe facts "
                             "({prompt, subject, target, dataset, record, source, margin}); empty = the shipped set")
    ppl_ratio: float = Field(1.05, ge=1, description="max perplexity on held-out text as a multiple of the baseline")
    retention_drop: float = Field(
        0.10, ge=0, description="max drop of earlier edits' retention compared with before the batch (0-1)")
    interference_threshold: float = Field(
        0.15, gt=0, description="max predicted interference ||dW K|| / ||W K|| on probe and earlier-edit keys "
        "(SmolLM2 + ENCORE: ~0.01 for 3 facts, ~0.07 for 10)")
    flash_k: float = Field(6.0, gt=0, description="a batch's update is a 'flash' above median + k * MAD of history")
    probe_facts: int = Field(40, ge=1, description="known facts whose accuracy is reported after every batch")
    probe_tokens: int = Field(1024, ge=16, description="held-out corpus tokens scored by the perplexity probe")
    probe_file: str = Field("", description="JSONL of facts the model must keep answering "
                            "({prompt, subject, target, case_id}); empty = the shipped known-fact set")
    max_tries: int = Field(3, ge=1, description="value optimisations a fact gets before it is `failed` (each retry "
                           "doubles the steps and widens the margin); a fact counts as applied only when the "
                           "model's greedy answer begins with its target")
    specificity_floor: float = Field(0.75, ge=0.0, le=1.0, description="share of its subject's other statements "
                                     "(those the unedited model is sure of) an edit must leave unchanged; below it the "
                                     "fact is optimised again with a stronger hold, then failed")
    retention_sample: int = Field(50, ge=1, description="applied facts sampled for the retention probe")
    consolidate_on_refresh: bool = Field(True, description="after `kagent refresh` has read its feeds, re-solve every "
                                         "applied fact from the base weights as one batch (`kagent consolidate`)")
    compact: bool = Field(True, description="with the entity memory, `kagent consolidate` moves the facts the damage "
                          "budget allows into the MLP weights (ENCORE's solve from the base weights); false = only "
                          "merge the chain's slots")
    compact_solve: Literal["method", "nullspace"] = Field(
        "method", description="the closed form a compaction writes the facts' target values with: the method's own "
        "(ENCORE's norm-constrained solve) or AlphaEdit's projection onto the null space of the base model's keys")
    compact_rounds: int = Field(4, ge=1, description="joint solves a compaction may try (each keeps the facts the "
                                "previous one's weights answered, or half of them when it was over budget)")
    compact_known_drop: float = Field(0.05, ge=0, description="max drop of known-fact accuracy a compaction may bring "
                                      "(absolute, 0-1, against the model before it)")
    compact_ppl_ratio: float = Field(1.03, ge=1, description="max held-out perplexity after a compaction as a multiple "
                                     "of the perplexity before it")
    compact_norm_growth: float = Field(1.05, ge=1, description="max ||W||_F growth of any edited layer a compaction may "
                                       "bring, against the base weights")
    compact_specificity_drop: float = Field(0.0, ge=0, le=1, description="how much lower than with the memory tier a "
                                            "fact's same-subject specificity may be with its edit in the weights (0: "
                                            "no lower); a fact below it keeps its slot and leaves the next round's solve")
    memory_slot_norm_max: float = Field(1.0, gt=0, description="memory-tier monitor: max norm of a slot as a multiple of "
                                        "the mean residual norm at the memory's layer on held-out text (an event says "
                                        "when a batch or compaction exceeds it)")
    memory_fire_rate_max: float = Field(0.05, ge=0, le=1, description="memory-tier monitor: max share of held-out "
                                        "text lines (about none of the facts) in which some slot fires")
    seed: int = Field(0, description="random seed for sampling probes and the 'random' order")
    max_prompt_tokens: int = Field(
        64, ge=1, description="most model tokens of a feed line's prompt with its subject filled in; longer lines are "
        "rejected at intake (CounterFact's longest: 23)")
    max_target_tokens: int = Field(16, ge=1, description="most model tokens of a feed line's target and old_target")
    max_paraphrases: int = Field(16, ge=0, description="most paraphrases a feed line may carry")
    max_paraphrase_tokens: int = Field(64, ge=1, description="most model tokens of each paraphrase")
    max_neighbors: int = Field(32, ge=0, description="most neighbours a feed line may carry")
    max_neighbor_prompt_tokens: int = Field(64, ge=1, description="most model tokens of each neighbour's prompt")
    max_neighbor_target_tokens: int = Field(16, ge=1, description="most model tokens of each neighbour's target")
    max_aliases: int = Field(8, ge=0, description="most aliases (other names of the subject) a feed line may carry")
    max_alias_tokens: int = Field(16, ge=1, description="most model tokens of each alias")
    ram_budget_mb: float = Field(
        0.0, ge=0, description="peak RAM (resident set, MiB) a batch may bring the process to; a batch estimated over "
        "it is split, a fact over it alone is quarantined; 0 = a sixth of total RAM (~4 GB on 24 GiB); on CUDA the "
        "GPU's free RAM bounds a batch instead")
    crash_isolate_after: int = Field(
        2, ge=1, description="runs that died (killed, out of RAM, crashed) while a fact's batch was applied, "
        "after which the fact is attempted alone")
    crash_quarantine_after: int = Field(
        1, ge=1, description="further deaths while the fact was attempted alone, after which it is quarantined")

    @field_validator("editor")
    @classmethod
    def _known_hparams(cls, editor: dict[str, Any]) -> dict[str, Any]:
        from editors.hparams import EditHParams

        unknown = sorted(set(editor) - set(EditHParams.model_fields))
        if unknown:
            raise ValueError(f"unknown editor hyperparameter(s) {', '.join(unknown)}")
        return editor

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        METHODS.get(method)  # an unknown name raises, naming the choices
        return method

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device != "auto":
            try:
                torch.device(device)
            except RuntimeError:
                raise ValueError("not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
        return device

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"not a model dtype: use {', '.join(DTYPE_CHOICES)}")
        return dtype

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, device_map: str) -> str:
        if device_map not in ("", "auto"):
            raise ValueError("device_map: use 'auto' or leave it empty")
        return device_map

    def resolved_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    def load_options(self) -> dict[str, str | None]:
        """Keyword arguments of editors.models.load_model for this workspace's model (device, dtype, device_map)."""
        return {"device": self.resolved_device(), "dtype": self.dtype, "device_map": self.device_map or None}

    def hparam_overrides(self) -> dict[str, Any]:
        """Editor hyperparameters this config overrides (the rest are the family's defaults)."""
        out: dict[str, Any] = dict(self.editor)
        if self.layers:
            out["layers"] = list(self.layers)
        if self.stats_tokens:
            out["stats_tokens"] = self.stats_tokens
        return out


def _toml_item(value: Any):
    """A JSON-typed value as a tomlkit item; tables inline, so every key stays at the top level of the file."""
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update({k: _toml_item(v) for k, v in value.items()})
        return table
    if isinstance(value, list):
        return [_toml_item(v) for v in value]
    return value


def to_toml(config: AgentConfig) -> str:
    """The config as TOML (tomlkit) with each field's description as a comment above it."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("kagent workspace configuration (edit freely; `kagent status` shows what is in use)"))
    doc.add(tomlkit.nl())
    values = config.model_dump(mode="json")
    for name, field in AgentConfig.model_fields.items():
        doc.add(tomlkit.comment(field.description))
        doc.add(name, _toml_item(values[name]))
    return tomlkit.dumps(doc)


def save_config(config: AgentConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_toml(config))
    tmp.replace(path)


def load_config(path: Path) -> AgentConfig:
    """The config at `path`; any problem with the file is a ConfigError whose message is one line."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config at {path}; run `kagent init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {_one_line(str(exc))}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {_one_line(str(exc))}") from None
    return checked_config(data, str(path))


def checked_config(values: dict[str, Any], where: str = "config") -> AgentConfig:
    """AgentConfig from `values` (old key names renamed), or a one-line ConfigError naming the first bad setting."""
    values = renamed_keys(values, where)
    try:
        return AgentConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc.errors()[0])}") from None


def renamed_keys(values: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """`values` with each old key of `RENAMED_KEYS` under its new name, logged; both names set is a ConfigError."""
    out = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where}: both {old} (the old name) and {new} are set; keep only {new}")
        log.warning("%s: config key %s is now %s; read as %s, written so when the workspace next saves its config",
                    where, old, new, new)
        out[new] = out.pop(old)
    return out


def _describe(err: dict) -> str:
    """One pydantic error as `key: problem`, naming the allowed keys for an unknown one."""
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown setting (allowed: {', '.join(AgentConfig.model_fields)})"
    return f"{where} = {_one_line(repr(err.get('input')))}: {_one_line(err['msg'])}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
