"""config.toml written by tomlkit: every value reads back as written, each key keeps its description as a comment;
a key an older kagent wrote under its old name (RENAMED_KEYS) reads under the new one and is written back renamed."""
from __future__ import annotations

import logging
import tomllib

import pytest

from agent.config import RENAMED_KEYS, AgentConfig, ConfigError, checked_config, load_config, to_toml
from agent.workspace import Workspace


def test_the_written_config_reads_back_equal_with_awkward_strings_and_tables():
    config = AgentConfig(feeds=['a "quoted" \\ path', "line\nbreak", "ünïcode\ttab"], layers=[3, 7],
                         editor={"write": "weights", "layers": [1, 2], "alpha": 0.5}, stats_corpus="C:\\corpus")
    text = to_toml(config)
    assert checked_config(tomllib.loads(text)) == config
    lines = text.splitlines()
    for name, field in AgentConfig.model_fields.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
        assert lines[at - 1] == f"# {field.description}"
    assert 'editor = {write = "weights", layers = [1, 2], alpha = 0.5}' in lines  # a table stays inline


OLD_CONFIG = '''# kagent workspace configuration, as a kagent before the RAM rename wrote it
# peak resident memory (MiB) a batch may bring the process to; ...
memory_budget_mb = 3000
batch_size = 8
'''


def test_a_config_with_the_old_memory_budget_key_loads_as_ram_budget_and_is_written_back_renamed(tmp_path, caplog):
    ws = Workspace.create(tmp_path / "ws", AgentConfig())
    ws.config_path.write_text(OLD_CONFIG)
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        cfg = ws.config()
    assert cfg.ram_budget_mb == 3000 and cfg.batch_size == 8
    warned = [r.getMessage() for r in caplog.records if r.name == "agent.config"]
    assert len(warned) == 1 and "memory_budget_mb is now ram_budget_mb" in warned[0] and "\n" not in warned[0]
    ws.save_config(cfg)
    text = ws.config_path.read_text()
    assert "ram_budget_mb = 3000.0" in text.splitlines() and "memory_budget_mb" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        assert ws.config() == cfg
    assert not [r for r in caplog.records if r.name == "agent.config"]  # nothing left to rename


def test_a_config_with_both_the_old_and_the_new_key_is_a_one_line_error_naming_both(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("memory_budget_mb = 3000\nram_budget_mb = 2000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: both memory_budget_mb (the old name) and ram_budget_mb are set; "
                              "keep only ram_budget_mb")


def test_every_renamed_key_names_a_field_and_no_old_name_is_still_one():
    for old, new in RENAMED_KEYS.items():
        assert new in AgentConfig.model_fields and old not in AgentConfig.model_fields
