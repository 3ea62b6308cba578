"""config.toml written by tomlkit: every value reads back as written, each key keeps its description as a comment."""
from __future__ import annotations

import tomllib

from agent.config import AgentConfig, checked_config, to_toml


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
