"""The weights tier as a GGUF file (`kagent export --format gguf`), for llama.cpp and the runtimes built on it.

The embedded model ships as a GGUF file, so the export starts from it: its metadata (architecture, hyperparameters,
tokenizer, chat template) and every tensor kagent did not edit are copied byte for byte, quantization included, and
the edited tensors (the MLP output projections of the edited layers, `blk.N.ffn_down.weight` on llama) are written
from the edited Hugging Face weights as F32 (or F16). Unedited tensors are found by dequantising the source tensor
and comparing it with the model's weight: transformers dequantises the same file when it loads the model, so an
unedited weight equals its source exactly.

GGUF keeps a tensor's dimensions innermost first (`ne`): an nn.Linear weight of shape (out, in) is stored with
ne = [in, out], which is what `GGUFWriter` writes for a numpy array of shape (out, in), so the HF weight is written
as it is. A model that was not loaded from a GGUF file has no source to copy from: `SourceMissing`, one line.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from editors.arch import arch_of, module_name, n_layers

log = logging.getLogger(__name__)

OUT_TYPES = {"f32": (np.float32, gguf.GGMLQuantizationType.F32), "f16": (np.float16, gguf.GGMLQuantizationType.F16)}


class SourceMissing(ValueError):
    """The model was not loaded from a GGUF file, so there is no metadata or tokenizer to copy."""


def gguf_arch(reader: gguf.GGUFReader) -> gguf.MODEL_ARCH:
    """The architecture the source file declares (`general.architecture`)."""
    name = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if name not in by_name:
        raise SourceMissing(f"GGUF architecture {name!r} is not known to the installed gguf package")
    return by_name[name]


def gguf_tensor_name(hf_name: str, arch: gguf.MODEL_ARCH, blocks: int) -> str:
    """The GGUF name of a Hugging Face parameter ("model.layers.3.mlp.down_proj.weight" -> "blk.3.ffn_down.weight")."""
    found = gguf.get_tensor_name_map(arch, blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise SourceMissing(f"parameter {hf_name} has no GGUF name for architecture {gguf.MODEL_ARCH_NAMES[arch]}")
    return found


def source_tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A tensor of the source file as float32, in the HF (out, in) layout."""
    t = next((t for t in reader.tensors if t.name == name), None)
    if t is None:
        raise SourceMissing(f"the source GGUF has no tensor {name}")
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(int(n) for n in reversed(t.shape)))


@torch.no_grad()
def edited_tensors(model: nn.Module, layers: list[int], reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weight (out, in) for every edited layer whose weight differs from the source file's."""
    arch, blocks, out = gguf_arch(reader), n_layers(model), {}
    for layer in layers:
        hf_name = module_name(model, layer) + ".weight"
        w = model.get_parameter(hf_name).detach().float().cpu().numpy()
        if arch_of(model).transposed:
            w = w.T
        name = gguf_tensor_name(hf_name, arch, blocks)
        src = source_tensor(reader, name)
        if src.shape != w.shape:
            raise ValueError(f"{name}: the model's weight is {w.shape}, the source GGUF's {src.shape}")
        if not np.array_equal(src, w):
            out[name] = np.ascontiguousarray(w)
    return out


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key-value field of the source (hyperparameters, tokenizer, chat template) but the writer's own."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def write_gguf(source: Path | str, out: Path | str, replace: dict[str, np.ndarray], out_type: str = "f32") -> Path:
    """`source` with the tensors named in `replace` written from those arrays ((out, in) float), as `out`."""
    reader = gguf.GGUFReader(str(source))
    names = {t.name for t in reader.tensors}
    unknown = sorted(set(replace) - names)
    if unknown:
        raise ValueError(f"the source GGUF has no tensor(s) {', '.join(unknown)}")
    np_type, ggml_type = OUT_TYPES[out_type]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf_arch(reader)], endianess=reader.endianess)
    copy_metadata(reader, writer)
    data = {}
    for t in reader.tensors:
        if t.name in replace:
            arr = np.ascontiguousarray(replace[t.name], dtype=np_type)
            if arr.shape != tuple(int(n) for n in reversed(t.shape)):
                raise ValueError(f"{t.name}: replacement of shape {arr.shape}, the source's is "
                                 f"{tuple(int(n) for n in reversed(t.shape))} (out, in)")
            writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=ggml_type)
        else:
            arr = t.data
            writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=t.tensor_type)
        data[t.name] = arr
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data[t.name])
    writer.close()
    log.info("wrote %s: %d tensor(s) replaced (%s), %d copied", out, len(replace), out_type, len(names) - len(replace))
    return Path(out)


def export_gguf(model: nn.Module, layers: list[int], source: Path | None, out: Path | str,
                out_type: str = "f32") -> list[str]:
    """The model's weights tier as GGUF at `out`, from the GGUF file it was loaded from; the replaced tensor names."""
    if source is None:
        raise SourceMissing("--format gguf needs a model loaded from a GGUF file (the embedded SmolLM2); export the "
                            "HF checkpoint and convert it with llama.cpp's convert_hf_to_gguf.py")
    replace = edited_tensors(model, layers, gguf.GGUFReader(str(source)))
    write_gguf(source, out, replace, out_type)
    return sorted(replace)
