"""Per-architecture facts, keyed by `config.model_type` (as peft does).

Each entry names the MLP output projection that locate-then-edit methods rewrite, where the
decoder blocks live, and whether the weight is stored transposed (GPT-2's Conv1D keeps
(in, out) instead of nn.Linear's (out, in)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnknownArchitecture(ValueError):
    """Raised for a model whose `config.model_type` has no entry in ARCHITECTURES."""


@dataclass(frozen=True)
class ArchSpec:
    module_template: str  # edited module, "{}" = layer index
    layers_path: str  # attribute path of the decoder block list
    final_norm: str  # attribute path of the final norm before the LM head
    transposed: bool = False  # weight stored as (in, out) (Conv1D)
    embed: str | None = None  # token embedding module, when inputs pass straight into the blocks
    rotary: str | None = None  # rotary-embedding module giving (cos, sin) to each block: enables the fast value path


_LLAMA_MLP, _LLAMA_EMBED, _LLAMA_ROPE = "model.layers.{}.mlp.down_proj", "model.embed_tokens", "model.rotary_emb"

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(_LLAMA_MLP, "model.layers", "model.norm", embed=_LLAMA_EMBED, rotary=_LLAMA_ROPE),
    "mistral": ArchSpec(_LLAMA_MLP, "model.layers", "model.norm", embed=_LLAMA_EMBED, rotary=_LLAMA_ROPE),
    "qwen2": ArchSpec(_LLAMA_MLP, "model.layers", "model.norm", embed=_LLAMA_EMBED, rotary=_LLAMA_ROPE),
    "gpt2": ArchSpec("transformer.h.{}.mlp.c_proj", "transformer.h", "transformer.ln_f", transposed=True),
    "gptj": ArchSpec("transformer.h.{}.mlp.fc_out", "transformer.h", "transformer.ln_f"),
    "gpt_neox": ArchSpec("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
}


def arch_of(model: nn.Module) -> ArchSpec:
    """The ArchSpec for `model`, or a clear error naming the unsupported type."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"model type {model_type!r} is not supported; known types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def module_name(model: nn.Module, layer: int) -> str:
    return arch_of(model).module_template.format(layer)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def layers_of(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers_path)


def weight_view(model: nn.Module, layer: int) -> torch.Tensor:
    """The edited weight of `layer` as an (out, in) view sharing storage with the module."""
    w = get_module(model, module_name(model, layer)).weight
    return w.data.T if arch_of(model).transposed else w.data


def key_dim(model: nn.Module, layer: int) -> int:
    return weight_view(model, layer).shape[1]


def n_layers(model: nn.Module) -> int:
    return len(layers_of(model))
