"""Fast tier: the GGUF writer of `kagent export --format gguf` on a tiny llama, read back with gguf.GGUFReader.

A source GGUF is built from the tiny model's own weights (the embedded SmolLM2 ships the same way): the edited MLP
output projection must come back as F32 equal to the edited HF weight, in GGUF's (in, out) dimension order, and every
other tensor and metadata field byte for byte as in the source, quantized ones included.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from memory.gguf_export import SourceMissing, edited_tensors, export_gguf, gguf_tensor_name, write_gguf

ARCH = gguf.MODEL_ARCH.LLAMA


def write_source(model, path) -> dict[str, np.ndarray]:
    """A GGUF of `model`: the embedding quantized to Q8_0, everything else F32; returns name -> stored array."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_embedding_length(model.config.hidden_size)
    writer.add_token_list([f"t{i}" for i in range(model.config.vocab_size)])
    writer.add_chat_template("{{ messages }}")
    stored = {}
    for hf_name, p in model.state_dict().items():
        if "rotary" in hf_name:
            continue
        name = gguf_tensor_name(hf_name, ARCH, model.config.num_hidden_layers)
        w = p.detach().float().numpy()
        if name == "token_embd.weight":
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[name] = q
        else:
            writer.add_tensor(name, w)
            stored[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_edited_layer_round_trips_and_the_rest_is_copied(tiny_llama, tmp_path):
    source, out = tmp_path / "src.gguf", tmp_path / "edited.gguf"
    stored = write_source(tiny_llama, source)
    assert edited_tensors(tiny_llama, [1, 2], gguf.GGUFReader(str(source))) == {}  # nothing edited yet
    w = tiny_llama.model.layers[2].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.01 * torch.randn_like(w))
    replaced = export_gguf(tiny_llama, [1, 2], source, out)
    assert replaced == ["blk.2.ffn_down.weight"]

    got = tensors(out)
    t = got["blk.2.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    assert [int(n) for n in t.shape] == [w.shape[1], w.shape[0]]  # ne: innermost (in) first
    np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.numpy())
    for name, arr in stored.items():
        if name != "blk.2.ffn_down.weight":
            assert got[name].tensor_type == tensors(source)[name].tensor_type, name
            assert np.asarray(got[name].data).tobytes() == arr.tobytes(), name
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert fields["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]


def test_f16_replacement_and_shape_check(tiny_llama, tmp_path):
    source = tmp_path / "src.gguf"
    write_source(tiny_llama, source)
    w = tiny_llama.model.layers[1].mlp.down_proj.weight.detach().numpy() + 1.0
    write_gguf(source, tmp_path / "h.gguf", {"blk.1.ffn_down.weight": w}, "f16")
    t = tensors(tmp_path / "h.gguf")["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.astype(np.float16))
    with pytest.raises(ValueError, match="blk.1.ffn_down.weight: replacement of shape"):
        write_gguf(source, tmp_path / "bad.gguf", {"blk.1.ffn_down.weight": w.T}, "f32")
    with pytest.raises(ValueError, match="no tensor"):
        write_gguf(source, tmp_path / "bad.gguf", {"blk.9.ffn_down.weight": w}, "f32")


def test_a_model_not_loaded_from_gguf_is_one_clear_line(tiny_llama, tmp_path):
    with pytest.raises(SourceMissing) as err:
        export_gguf(tiny_llama, [1], None, tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and "convert_hf_to_gguf" in str(err.value)
