"""Shared fixtures: tiny random models, a character-level toy tokenizer, the toy embedder (no downloads), the tiny
trained fact model's location, and the one fake of the verified application (`every_fact_answers`, opt-in per module).

An autouse fixture points KAGENT_HOME at a temp dir so no test touches the user's data. Smoke and slow tests that load
the embedded model ask for `user_cache`: one temp KAGENT_HOME for the whole run (`real_model_home`), into which the
user's dequantised SmolLM2 and covariance statistics are linked (read-only use) instead of being recomputed, and where
whatever is missing is computed once for every such test.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

# One torch thread per test process. xdist runs a worker per core, and each worker's default intra-op threads on top
# oversubscribe the cores: small ops then wait on each other's threads (measured with another process busy:
# test_entity_memory.py's calls took 1.3 s on one thread against 45 s on two). Set before torch is imported so that
# subprocesses the tests start inherit it; the slow and smoke tiers (the embedded model) get the cores back, shared
# out among the xdist workers (`all_cores_for_the_real_model`).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
import re
import string
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import platformdirs
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


STOPWORDS = {"the", "a", "an", "is", "was", "of"}


class ToyEmbedder:
    """Deterministic bag of words: each non-stopword hashes to a coordinate; rows are L2-normalised. No download;
    relations sharing their words bar stopwords embed alike. Records the texts of each call in `calls`."""

    name = "toy-bow-64"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word not in STOPWORDS:
                    out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            out[row] /= max(np.linalg.norm(out[row]), 1e-9)
        return out


def poison(monkeypatch, subject: str, size: float = 100.0) -> None:
    """FAKE editor output (not verification): every batch holding a fact about `subject` writes a random rank-4
    update of `size` x ||W|| into each edited layer, as a broken solve might."""
    import agent.batch
    from editors.arch import weight_view
    from editors.delta import LayerDelta

    real = agent.batch.compute

    def destructive(session, group, also=()):
        result = real(session, group, also)
        if any(f.record.subject == subject for f in group):
            gen = torch.Generator().manual_seed(0)
            for i, d in enumerate(result.delta.layers):
                w = weight_view(session.model, d.layer)
                u, v = torch.randn(w.shape[0], 4, generator=gen), torch.randn(w.shape[1], 4, generator=gen)
                u *= size * float(w.norm()) / float((u @ v.T).norm())
                result.delta.layers[i] = LayerDelta(d.layer, u, v)
        return result

    monkeypatch.setattr(agent.batch, "compute", destructive)


@contextmanager
def toy_agent(home: Path):
    """For a block: the toy embedder as the agent's default, KAGENT_HOME at `home` and torch on one thread; yields
    the block's MonkeyPatch (undone at its end) for further patches. What a module-scoped fixture that builds a
    workspace with the CLI needs."""
    import agent.session

    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setattr(agent.session, "default_embedder", ToyEmbedder)
        mp.setenv("KAGENT_HOME", str(home))
        yield mp


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One KAGENT_HOME for a module, so the tiny models' covariance statistics are computed once."""
    return tmp_path_factory.mktemp("kagent-home")


@pytest.fixture
def toy_embedder(shared_home):
    """`toy_agent(shared_home)` for one test; modules whose tests share a workspace opt in with `usefixtures`."""
    with toy_agent(shared_home):
        yield


@contextmanager
def one_thread():
    """torch on one thread: on two shared cores the tiny models run several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rand_delta(model, layers, seed: int, rank: int = 2):
    """A random low-rank update of `layers` (small enough to keep the model finite)."""
    from editors.arch import weight_view
    from editors.delta import EditDelta, LayerDelta

    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in layers:
        o, i = weight_view(model, layer).shape
        out.append(LayerDelta(layer, 0.05 * torch.randn(o, rank, generator=g), torch.randn(i, rank, generator=g)))
    return EditDelta(out)


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """A script of scripts/ (not an installed package) imported from its file, as `python scripts/NAME.py` runs it."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CHARS = string.ascii_letters + string.digits + " .,:;!?'\"-()"


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; decodes back to the exact string."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<eos>")


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrain(model, tok, steps: int = 40):
    """A few Adam steps of character-level LM on the shipped corpus, so perplexity means something."""
    from editors.corpus import stats_text

    data = torch.tensor(tok(stats_text()[:20000]).input_ids)
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=gen)
        x = torch.stack([data[s:s + 32] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return model.eval()


# the user's KAGENT_HOME as it was before any fixture replaced it
USER_HOME = Path(os.environ.get("KAGENT_HOME") or platformdirs.user_data_dir("kagent"))


def _every_fact_answers(session, facts, before=None, same=None):
    return [True] * len(facts)


def every_fact_answers(mp: pytest.MonkeyPatch) -> None:
    """FAKE, for tests of the agent's plumbing on tiny random models: the verified application's question "does the
    model answer this fact?" (`agent.batch.answered`, also bound in agent.consolidate) says yes to every fact. A tiny
    random model cannot be made to answer an edited fact greedily, so without it every fact would end `failed`.
    Each module or fixture that calls this says why in a comment; tests of verification itself (facts that do not
    take, edits that damage other facts) ask the tiny trained model of tests/assets/tiny_fact_model for real
    (tests/test_tiny_fact_model.py). Never session-wide."""
    import agent.batch
    import agent.consolidate

    mp.setattr(agent.batch, "answered", _every_fact_answers)
    mp.setattr(agent.consolidate, "answered", _every_fact_answers)


@contextmanager
def facts_answering():
    """`every_fact_answers` for a block, e.g. a module-scoped fixture that builds a workspace with `watch`."""
    with pytest.MonkeyPatch.context() as mp:
        every_fact_answers(mp)
        yield


@pytest.fixture
def facts_answer():
    """`every_fact_answers` for one test (see there: a fake, and why); its own MonkeyPatch, so a test's
    `monkeypatch.undo()` of its other patches keeps it."""
    with facts_answering():
        yield


# xdist hands out whole files (pyproject: --dist loadfile), so a module-scoped workspace is built once, on one worker.
# These files go first, longest first: a long file handed out last would finish last while the other worker idles.
LONG_FILES = ["test_reliability_crash.py", "test_cli.py", "test_reliability_input.py", "test_index_kill.py",
              "test_consolidate.py", "test_editors.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture
def monkeypatch():
    """pytest's `monkeypatch`, which also puts the verified application's `answered` back when it is undone. A test
    that patches `answered` with `monkeypatch` over `facts_answer`'s fake has two MonkeyPatch objects on one attribute,
    undone in the wrong order (the fake's first): the fake outlived the test, and the next file on the same worker
    (test_tiny_fact_model.py after test_cli.py) saw every fact answer without asking the model."""
    import agent.batch
    import agent.consolidate

    real = agent.batch.answered, agent.consolidate.answered
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
    agent.batch.answered, agent.consolidate.answered = real


def real_model_threads() -> int:
    """torch threads for a test on the embedded model: the cores shared out among the xdist workers. Each of two
    workers on two cores taking both oversubscribes them, which slows torch far more than the lost parallelism."""
    return max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def all_cores_for_the_real_model(request, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in ("slow", "smoke")):
        before, threads = torch.get_num_threads(), real_model_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
        yield
        torch.set_num_threads(before)
    else:
        yield


@pytest.fixture(autouse=True)
def kagent_home(tmp_path, monkeypatch):
    home = tmp_path / "kagent-home"
    monkeypatch.setenv("KAGENT_HOME", str(home))
    return home


def link_user_cache(home: Path, source: Path = USER_HOME) -> list[Path]:
    """Symlink the dequantised models and cached statistics files of `source`/cache into `home`/cache.

    Only files and model directories that already exist are linked, one by one, so whatever a test computes anew
    is written into `home`, never into the user's cache. Returns the links made (none when the user has no cache:
    the test then computes everything itself, as on a fresh machine).
    """
    src, dst = source / "cache", home / "cache"
    made = []
    for model in sorted((src / "models").glob("*")):
        if (model / "model.safetensors").is_file() and not (dst / "models" / model.name).exists():
            (dst / "models").mkdir(parents=True, exist_ok=True)
            (dst / "models" / model.name).symlink_to(model, target_is_directory=True)
            made.append(dst / "models" / model.name)
    for stats in sorted((src / "stats").glob("*.safetensors")):
        if not (dst / "stats" / stats.name).exists():
            (dst / "stats").mkdir(parents=True, exist_ok=True)
            (dst / "stats" / stats.name).symlink_to(stats)
            made.append(dst / "stats" / stats.name)
    return made


STATS_TOKENS = 20_000  # the smoke tier's covariance statistics: the default's code path at a fifth of its cost


@pytest.fixture(scope="session")
def real_model_home(tmp_path_factory) -> Path:
    """One KAGENT_HOME for every test on the embedded model in a run, shared by the xdist workers, with the user's
    cached model and statistics linked in (link_user_cache). The first worker to ask dequantises the GGUF and
    computes the STATS_TOKENS statistics there (`kagent stats`) while the others wait on a file lock, so a machine
    without the user's cache (CI) pays for them once, not once per test or per worker."""
    from click.testing import CliRunner
    from filelock import FileLock

    from agent.cli import cli

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common temp dir
    home = root / "real-model-home"
    with FileLock(str(root / "real-model-home.lock")):
        if not (home / "prepared").exists():
            link_user_cache(home)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KAGENT_HOME", str(home))
                threads = torch.get_num_threads()
                torch.set_num_threads(CORES)  # the other workers wait on the lock
                res = CliRunner().invoke(cli, ["stats", "--tokens", str(STATS_TOKENS)])
                torch.set_num_threads(threads)
            assert res.exit_code == 0, res.output
            (home / "prepared").touch()
    return home


@pytest.fixture
def user_cache(real_model_home, kagent_home, monkeypatch):
    """KAGENT_HOME for one test on the embedded model: the run's shared real_model_home (over kagent_home's)."""
    monkeypatch.setenv("KAGENT_HOME", str(real_model_home))
    return real_model_home


@pytest.fixture
def tok():
    return toy_tokenizer()


TINY_FACT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny_fact_model"  # scripts/train_tiny_fact_model.py


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return _freeze(LlamaForCausalLM(cfg))


def make_tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    return _freeze(GPT2LMHeadModel(cfg))


@pytest.fixture
def tiny_llama(tok):
    return make_tiny_llama(len(tok))


@pytest.fixture
def tiny_gpt2(tok):
    return make_tiny_gpt2(len(tok))
