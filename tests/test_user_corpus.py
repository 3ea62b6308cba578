"""A user's statistics corpus (--stats-corpus): text and JSONL read as a stream, statistics cached by content hash."""
from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama, one_thread
from editors.stats import layer_stats
from editors.user_corpus import CorpusError, UserCorpus


def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The river runs past the old mill. " * 40)
    rows = [{"id": 1, "text": "Rome is a city in Italy."}, {"title": "Oslo is in Norway."}, {"text": ""}]
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return root


def test_texts_digest_and_tokens_are_streamed(tmp_path, tok):
    root = corpus_dir(tmp_path)
    corpus = UserCorpus(root)
    texts = list(corpus.texts())
    assert texts[0].startswith("The river") and texts[1:] == ["Rome is a city in Italy.", "Oslo is in Norway."]
    digest = corpus.digest()
    assert digest == UserCorpus(root).digest() and digest.startswith("u")
    assert len(corpus.token_ids(tok, 100)) == 100  # stops at the tokens asked for
    (root / "a.txt").write_text("changed")
    assert UserCorpus(root).digest() != digest


def test_bad_corpora_are_one_line_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        UserCorpus(tmp_path / "empty").digest()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(CorpusError, match="line 1: not valid JSON"):
        UserCorpus(bad).token_ids(tok, 10)


def test_statistics_over_a_user_corpus_are_cached_by_its_hash(tmp_path, tok, kagent_home):
    model = make_tiny_llama(len(tok))
    corpus = UserCorpus(corpus_dir(tmp_path))
    with one_thread():
        first = layer_stats(model, tok, [1], corpus, n_tokens=600, seq_len=64)
    files = list((kagent_home / "cache" / "stats").glob(f"*-{corpus.digest()}-600.safetensors"))
    assert len(files) == 1 and first[1].count == 576  # 9 sequences of 64 tokens
    again = layer_stats(model, tok, [1], corpus, n_tokens=600, seq_len=64)
    assert (again[1].mom2 == first[1].mom2).all()
