"""Per-model defaults (editors/defaults.py): reference settings resolved from a config alone, an 8B model on the
meta device included; the nearest-size rule for unknown sizes; a user hyperparameter file."""
from __future__ import annotations

import torch
from transformers import (GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          Qwen2Config)

from editors.arch import key_dim
from editors.registry import hparams_for, resolve_hparams


def llama(hidden: int, depth: int, **more) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=max(1, hidden // 128),
                       **more)


def test_an_8b_llama_on_the_meta_device_gets_the_reference_settings():
    cfg = llama(4096, 32, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)  # no weights: nothing is allocated
    assert next(model.parameters()).is_meta and key_dim(model, 4) == 14336
    encore = resolve_hparams("encore", model.config)
    hp = encore.hparams
    assert hp.layers == [4, 5, 6, 7, 8] and hp.mom2_weight == 15000 and hp.lr == 0.5 and hp.alpha == 20
    assert hp.stop == "mpes" and "Llama-3-8B" in encore.reason and "llama3-8b.json" in encore.reason
    memit = hparams_for("memit", model.config)
    assert memit.layers == [4, 5, 6, 7, 8] and memit.mom2_weight == 15000 and memit.alpha == 0 and memit.stop == "nll"
    assert hparams_for("alphaedit", model.config).lr == 0.1


def test_smollm2_keeps_its_measured_settings():
    hp = hparams_for("encore", llama(576, 30, intermediate_size=1536))
    assert (hp.layers, hp.mom2_weight, hp.lr, hp.alpha, hp.write, hp.n_context) == \
        ([3, 4, 5, 6, 7], 3000.0, 2.0, 10.0, "memory", 2)
    assert (hp.memory_layer, hp.value_layer) == (17, 17)  # the entity memory sits above the weight-edit layers
    weights = hparams_for("encore", llama(576, 30, intermediate_size=1536), write="weights")
    assert weights.value_layer == 7  # the weight solve keeps its values at the last edited layer
    scaled = hparams_for("encore", llama(576, 12, intermediate_size=1536))
    assert scaled.memory_layer is None and scaled.value_layer == scaled.layers[-1]  # measured on 30 layers only
    assert hparams_for("memit", llama(576, 30)).lr == 0.5


def test_gpt2_xl_qwen_mistral_and_gpt_j_reference_settings():
    hp = hparams_for("encore", GPT2Config(n_embd=1600, n_layer=48, n_head=25))
    assert (hp.layers, hp.mom2_weight, hp.max_steps, hp.alpha) == ([13, 14, 15, 16, 17], 20000.0, 20, 10.0)
    for cfg in (Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28),
                MistralConfig(hidden_size=4096, num_hidden_layers=32)):
        hp = hparams_for("encore", cfg)
        assert hp.layers == [4, 5, 6, 7, 8] and hp.mom2_weight == 15000 and hp.alpha == 20
    assert hparams_for("alphaedit", Qwen2Config(hidden_size=3584, num_hidden_layers=28,
                                                num_attention_heads=28)).alphaedit_l2 == 1.0
    assert hparams_for("memit", GPTJConfig(n_embd=4096, n_layer=28, n_head=16)).layers == [3, 4, 5, 6, 7, 8]


def test_unknown_sizes_take_the_nearest_entry_with_layers_scaled_by_depth():
    chosen = resolve_hparams("encore", llama(8192, 80))  # a 70B-shaped llama
    assert chosen.hparams.layers == [10, 11, 12, 13, 14] and chosen.hparams.mom2_weight == 15000
    assert "nearest" in chosen.reason and "Llama-3-8B" in chosen.reason
    tiny = hparams_for("encore", llama(32, 4))  # the tests' tiny llama: SmolLM2's settings, layers scaled
    assert tiny.layers == [0, 1, 2] and tiny.mom2_weight == 3000
    other = resolve_hparams("memit", GPTNeoXConfig(hidden_size=512, num_hidden_layers=16, num_attention_heads=8))
    assert other.hparams.layers == [2, 3, 4, 5, 6] and "gpt_neox" in other.reason


def test_a_user_hparams_file_goes_over_the_table_and_under_overrides(tmp_path):
    path = tmp_path / "hp.toml"
    path.write_text('mom2_weight = 9000.0\n\n[encore]\nalpha = 3.0\n\n[memit]\nalpha = 99.0\n')
    chosen = resolve_hparams("encore", llama(4096, 32), path, lr=1.0)
    assert (chosen.hparams.mom2_weight, chosen.hparams.alpha, chosen.hparams.lr) == (9000.0, 3.0, 1.0)
    assert "hp.toml" in chosen.reason and "lr" in chosen.reason
    assert "layers 4-8, lambda 9000" in chosen.summary()
