"""The method registry, and the one call that builds an editor for a model.

A method is declared once, by its Editor subclass (`name`, `defaults`, `solve`), and
`METHODS.register(Cls)` is the one line that makes it a method: the CLI's choices, the config's
validation, the benchmark and the tests read the names from here. A second method of the same
name is an error. Per-model settings (which layers, lambda, learning rate on Llama-3-8B, GPT-J, ...) live in
the table of editors/defaults.py, resolved from the model's config alone.
"""
from __future__ import annotations

from torch import nn

from editors.alphaedit import AlphaEdit
from editors.arch import arch_of
from editors.core import Editor
from editors.defaults import Resolved, resolve
from editors.encore import Encore
from editors.hparams import EditHParams
from editors.memit import Memit
from editors.state import EditorState
from editors.stats import default_corpus, layer_stats


class DuplicateMethod(ValueError):
    """A method is registered under a name another method already has."""


class MethodRegistry:
    """Editing methods by name, in registration order."""

    def __init__(self) -> None:
        self._editors: dict[str, type[Editor]] = {}

    def register(self, editor: type[Editor]) -> type[Editor]:
        if editor.name in self._editors:
            raise DuplicateMethod(f"method {editor.name!r} is already registered "
                                  f"(by {self._editors[editor.name].__qualname__})")
        self._editors[editor.name] = editor
        return editor

    def names(self) -> list[str]:
        return list(self._editors)

    def get(self, method: str) -> type[Editor]:
        if method not in self._editors:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(self._editors))}")
        return self._editors[method]


METHODS = MethodRegistry()
METHODS.register(Encore)
METHODS.register(Memit)
METHODS.register(AlphaEdit)


def resolve_hparams(method: str, config, hparams_file=None, **overrides) -> Resolved:
    """The method's settings for the model `config` describes (editors.defaults), with the reason they were chosen."""
    return resolve(method, METHODS.get(method).defaults, config, hparams_file, **overrides)


def hparams_for(method: str, config, hparams_file=None, **overrides) -> EditHParams:
    """The method's defaults, then the per-model table's settings for `config`, then the file, then `overrides`."""
    return resolve_hparams(method, config, hparams_file, **overrides).hparams


def make_editor(method: str, model: nn.Module, tok, hparams: EditHParams | None = None,
                state: EditorState | None = None, corpus=None, hparams_file=None,
                **overrides) -> Editor:
    """An editor of `method` for `model`: typed defaults for its family and size, cached covariance stats."""
    editor = METHODS.get(method)
    hp = hparams or hparams_for(method, model.config, hparams_file, **overrides)
    arch_of(model)
    stats = layer_stats(model, tok, hp.layers, corpus if corpus is not None else default_corpus(), hp.stats_tokens)
    return editor(model, tok, hp, stats, state)
