"""Per-model default hyperparameters: a table keyed by `config.model_type`, one entry per known model size.

An entry names a model (family + hidden size + layer count, read from its config alone, so an 8B config on the
`meta` device resolves without weights), the settings every method shares on it (`common`: edited layers, lambda,
value optimisation) and what differs per method (`methods`), with the source of the numbers. `resolve` picks:

1. the entry whose model_type, hidden size and layer count all match (exact);
2. else the nearest entry of the same family (by hidden size, log scale), its layers scaled to the model's depth
   (first layer and count kept in proportion), everything else as that entry has it;
3. else (a family nobody has numbers for) the method's own defaults on MEMIT's GPT-J layer choice scaled to depth;

then a user's hyperparameter file (TOML or JSON: EditHParams fields, optionally per method under a table named
after it), then explicit overrides. `Resolved.reason` says which rule chose what; `kagent init` prints it.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from editors.hparams import SMOLLM2, EditHParams, scaled_layers

_MEMIT_VALUES = {"mom2_weight": 15000.0, "lr": 0.5, "max_steps": 25, "clamp_factor": 0.75, "kl_factor": 0.0625,
                 "weight_decay": 0.5}  # MEMIT's value optimisation and lambda (GPT-J, Llama-3-8B)
_ALPHAEDIT = {"nullspace_threshold": 2e-2, "alphaedit_l2": 10.0}  # AlphaEdit's three reference models


@dataclass(frozen=True)
class ModelDefaults:
    name: str  # the model the numbers were set for
    hidden: int  # config.hidden_size (n_embd)
    n_layers: int  # config.num_hidden_layers (n_layer)
    common: dict  # settings of every method on this model (layers included)
    methods: dict = field(default_factory=dict)  # method name -> settings over `common`
    source: str = ""  # where the numbers come from

    def settings(self, method: str) -> dict:
        return {**self.common, **self.methods.get(method, {})}


MODEL_DEFAULTS: dict[str, list[ModelDefaults]] = {
    "llama": [
        ModelDefaults("SmolLM2-135M", 576, 30, dict(SMOLLM2), {"encore": {"lr": 2.0, "memory_layer": 17}},
                      "measured on SmolLM2 (BENCHMARKS.md, sweep: lambda 3000; lr 2 halves ENCORE's MPES steps; "
                      "entity memory at layer 17: 1.8x the speed of layer 7 on the hold-out, equal quality)"),
        ModelDefaults("Llama-3-8B", 4096, 32, {"layers": [4, 5, 6, 7, 8], **_MEMIT_VALUES},
                      {"encore": {"alpha": 20.0}, "alphaedit": {"lr": 0.1, **_ALPHAEDIT}},
                      "ENCORE reference hparams/ENCORE/llama3-8b.json (layers 4-8, lambda 15000, lr .5, "
                      "update_norm_lambda 20; scalable-model-editing/knowledge-editing-regularization), MEMIT the same "
                      "repo's llama3-8b.json, AlphaEdit jianghoucheng/AlphaEdit Llama3-8B.json (lr .1)"),
    ],
    "mistral": [
        ModelDefaults("Mistral-7B", 4096, 32, {"layers": [4, 5, 6, 7, 8], **_MEMIT_VALUES},
                      {"encore": {"alpha": 20.0}, "alphaedit": dict(_ALPHAEDIT)},
                      "layers 4-8, lambda 15000, lr .5 from EasyEdit hparams/MEMIT/mistral-7b.yaml; ENCORE's alpha "
                      "20 and AlphaEdit's threshold/L2 by rule: those of the same-shaped Llama-3-8B"),
    ],
    "qwen2": [
        ModelDefaults("Qwen2.5-7B", 3584, 28, {"layers": [4, 5, 6, 7, 8], **_MEMIT_VALUES},
                      {"encore": {"alpha": 20.0}, "alphaedit": {**_ALPHAEDIT, "alphaedit_l2": 1.0}},
                      "layers 4-8, lambda 15000, lr .5 from EasyEdit hparams/MEMIT/qwen2.5-7b.yaml and "
                      "hparams/AlphaEdit/qwen2.5-7b.yaml (L2 1); ENCORE's alpha 20 by rule: Llama-3-8B's"),
    ],
    "gptj": [
        ModelDefaults("GPT-J-6B", 4096, 28, {"layers": [3, 4, 5, 6, 7, 8], **_MEMIT_VALUES},
                      {"encore": {"alpha": 10.0}, "alphaedit": dict(_ALPHAEDIT)},
                      "kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json (layers 3-8, lambda 15000, lr .5), "
                      "AlphaEdit EleutherAI_gpt-j-6B.json; ENCORE's alpha 10 by rule: its GPT2-XL value"),
    ],
    "gpt2": [
        ModelDefaults("GPT2-XL", 1600, 48, {"layers": [13, 14, 15, 16, 17], **_MEMIT_VALUES, "mom2_weight": 20000.0,
                                            "max_steps": 20},
                      {"encore": {"alpha": 10.0}, "alphaedit": dict(_ALPHAEDIT)},
                      "ENCORE reference hparams/ENCORE/gpt2-xl.json (layers 13-17, lambda 20000, lr .5, 20 steps, "
                      "update_norm_lambda 10), MEMIT the same, AlphaEdit jianghoucheng/AlphaEdit gpt2-xl.json"),
    ],
}


@dataclass(frozen=True)
class Resolved:
    hparams: EditHParams
    reason: str  # which rule chose the settings, and from where

    def summary(self) -> str:
        """One line: the settings that matter most, then why."""
        hp = self.hparams
        layers = f"{hp.layers[0]}-{hp.layers[-1]}" if hp.layers == list(range(hp.layers[0], hp.layers[-1] + 1)) \
            else ",".join(map(str, hp.layers))
        memory = f" at layer {hp.value_layer}" if hp.write == "memory" else ""
        return (f"layers {layers}, lambda {hp.mom2_weight:g}, lr {hp.lr:g}, alpha {hp.alpha:g}, stop {hp.stop}, "
                f"write {hp.write}{memory} ({self.reason})")


def model_shape(config) -> tuple[str, int, int]:
    """(model_type, hidden size, layer count) from a transformers config (no weights needed)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return config.model_type, int(hidden), int(depth)


def scale_layers(layers: list[int], ref_depth: int, depth: int) -> list[int]:
    """`layers` of a ref_depth-layer model moved to a depth-layer one: first layer in proportion, count kept."""
    first = max(0, round(layers[0] * depth / ref_depth))
    return [i for i in range(first, first + len(layers)) if i < depth - 1] or [max(0, depth - 2)]


def _nearest(entries: list[ModelDefaults], hidden: int, depth: int) -> ModelDefaults:
    return min(entries, key=lambda e: (abs(math.log(hidden / e.hidden)), abs(e.n_layers - depth)))


def table_choice(method: str, method_defaults: dict, config) -> tuple[dict, str]:
    """Settings for `method` on the model `config` describes, before any file or override, and why."""
    model_type, hidden, depth = model_shape(config)
    entries = MODEL_DEFAULTS.get(model_type, [])
    exact = [e for e in entries if (e.hidden, e.n_layers) == (hidden, depth)]
    if exact:
        e = exact[0]
        return {**method_defaults, **e.settings(method)}, f"{e.name}: {e.source}"
    if entries:
        e = _nearest(entries, hidden, depth)
        layers = scale_layers(e.common["layers"], e.n_layers, depth)
        why = (f"no entry for {model_type} with hidden {hidden} and {depth} layers: the nearest, {e.name}'s settings, "
               f"its layers {e.common['layers'][0]}-{e.common['layers'][-1]} of {e.n_layers} scaled to {depth}")
        settings = {k: v for k, v in e.settings(method).items() if k != "memory_layer"}  # measured on e's depth only
        return {**method_defaults, **settings, "layers": layers}, why
    why = f"no defaults for model type {model_type!r}: the method's own, MEMIT's GPT-J layers scaled to {depth}"
    return {"layers": scaled_layers(depth), **method_defaults}, why


def read_hparams_file(path: str | Path, method: str) -> dict:
    """EditHParams fields from a TOML or JSON file; a table named after a method applies to that method only."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    shared = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return {**shared, **data.get(method, {})}


def resolve(method: str, method_defaults: dict, config, hparams_file: str | Path | None = None,
            **overrides) -> Resolved:
    """EditHParams for `method` on the model `config` describes: table, then file, then overrides (see module doc)."""
    values, why = table_choice(method, method_defaults, config)
    if hparams_file:
        values |= read_hparams_file(hparams_file, method)
        why += f"; over them {Path(hparams_file).name}"
    if overrides:
        why += f"; set: {', '.join(sorted(overrides))}"
    return Resolved(EditHParams(**{**values, **overrides}), why)
