"""Method registry and the one call that builds an editor for a model."""
from __future__ import annotations

from torch import nn

from editors.alphaedit import AlphaEdit
from editors.arch import arch_of, n_layers
from editors.core import Editor
from editors.encore import Encore
from editors.hparams import EditHParams, hparams_for
from editors.memit import Memit
from editors.state import EditorState
from editors.stats import default_corpus, layer_stats

METHODS: dict[str, type[Editor]] = {cls.name: cls for cls in (Encore, Memit, AlphaEdit)}


def make_editor(method: str, model: nn.Module, tok, hparams: EditHParams | None = None,
                state: EditorState | None = None, corpus: str | None = None, **overrides) -> Editor:
    """An editor of `method` for `model`: typed defaults for its family, cached covariance stats."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    hp = hparams or hparams_for(method, model.config.model_type, n_layers(model), **overrides)
    arch_of(model)
    stats = layer_stats(model, tok, hp.layers, corpus if corpus is not None else default_corpus(), hp.stats_tokens)
    return METHODS[method](model, tok, hp, stats, state)
