"""`kagent serve` as users use it: a live uvicorn server on 127.0.0.1 over a tiny random Llama's workspace, asked
with the official `openai` client (both endpoints, streaming and not), auth, 20+ kinds of bad request, a full
queue, and facts committed and rolled back by `kagent watch`/`rollback` going live without a restart.

A random model's answers mean nothing, so the live-edit test checks what can be checked: the batch the server
names changes within 5 s of the commit, and the served answer is exactly what `generate` gives on a separately
loaded model with that batch's edits (`load_edits`, as `kagent ask` loads them).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

try:
    import httpx2 as httpx  # the HTTP client newer openai releases ship on
except ImportError:
    import httpx
import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner

import agent.session
from agent.cli import cli, load_edits
from agent.serve import ServeOptions, create_app
from agent.served import RWLock, ServedModel
from agent.workspace import Workspace
from conftest import make_tiny_llama, one_thread, pretrain, toy_agent, toy_tokenizer
from editors.models import load_model
from memory.ledger import Ledger

pytestmark = pytest.mark.usefixtures("toy_embedder")  # the toy embedder and one KAGENT_HOME for every test

KEY = "sk-test-kagent"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "Paris is the capital of"
LIVE = "Paris"  # ends on the edited subject: a tiny random model's next token hardly sees a slot further back


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def ws(tmp_path_factory, shared_home):
    """A tiny random Llama (with a chat template) and a workspace on it, with small probes so watch is quick."""
    tok = toy_tokenizer()
    tok.chat_template = TEMPLATE
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    with one_thread():
        pretrain(make_tiny_llama(len(tok)), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = tmp_path_factory.mktemp("serve") / "ws"
    with toy_agent(shared_home):
        res = run("init", "--model", model_dir, "--layers", "1,2", "--stats-tokens", "2000", "--workspace", root)
        assert res.exit_code == 0, res.output
        w = Workspace.open(root)
        w.save_config(w.config().model_copy(update={"probe_tokens": 128, "probe_facts": 4, "retention_sample": 4}))
        session = agent.session.open_session(w)
        session.baseline()
        session.close()
    return w


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serving(served: ServedModel, poll: bool = False, **options):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields its base URL. With `poll`, it runs the
    served model's ledger poller (one server per served model does)."""
    sock = free_socket()
    app = create_app(served, ServeOptions(port=sock.getsockname()[1], **options), poll=poll)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def served(ws, shared_home):
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("KAGENT_HOME", str(shared_home))
        s = ServedModel.open(ws, poll_s=0.1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(served):
    limits = {"max_tokens": 64, "max_prompt_tokens": 200, "max_body_bytes": 64 * 1024}
    with serving(served, poll=True, api_key=KEY, **limits) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def model_id(client) -> str:
    return client.models.list().data[0].id


def reference(ws: Workspace, prompt: str, tokens: int) -> str:
    """What `generate` answers on a freshly loaded model with the ledger's committed edits (as `kagent ask`)."""
    cfg = ws.config()
    loaded = load_model(cfg.model, **cfg.load_options())
    with Ledger(ws.ledger_dir) as ledger:
        memory = load_edits(ledger, loaded)
    x = loaded.tok(prompt, return_tensors="pt")
    with (memory.attached(loaded.model) if memory else nullcontext()), torch.no_grad():
        out = loaded.model.generate(**x, max_new_tokens=tokens, do_sample=False, pad_token_id=loaded.tok.pad_token_id,
                                    eos_token_id=loaded.tok.eos_token_id)
    return loaded.tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


def test_both_endpoints_answer_through_the_openai_client_streamed_and_not(client, ws):
    mid = model_id(client)
    raw = client.completions.with_raw_response.create(model=mid, prompt=PROMPT, max_tokens=12)
    done = raw.parse()
    assert raw.headers["x-kagent-batch"] == "0" and done.system_fingerprint == "kagent-b0"
    assert done.choices[0].text == reference(ws, PROMPT, 12)
    assert done.usage.prompt_tokens == len(PROMPT) and done.usage.completion_tokens <= 12  # toy: a token a char
    pieces = list(client.completions.create(model=mid, prompt=PROMPT, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == done.choices[0].finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    chat = client.chat.completions.create(model=mid, messages=messages, max_tokens=10)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert chat.usage.prompt_tokens == len("system: Be brief. | user: Where is Paris? | assistant:")
    chunks = list(client.chat.completions.create(model=mid, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    again = client.chat.completions.create(model=mid, messages=messages, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == text  # greedy by default: reproducible


def test_stop_strings_end_the_answer_before_them_streamed_and_not(client):
    mid = model_id(client)
    full = client.completions.create(model=mid, prompt=PROMPT, max_tokens=20).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=mid, prompt=PROMPT, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=mid, prompt=PROMPT, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_with_a_seed_is_reproducible(client):
    mid = model_id(client)
    ask = dict(model=mid, prompt=PROMPT, max_tokens=16, temperature=1.5, seed=7)
    a, b = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert a == b


def test_auth_is_required(url):
    mid = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/completions")):
            r = httpx.request(method, url + path, headers=headers, json={"model": mid, "prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=mid, prompt="x", max_tokens=2)


def bad_requests(mid: str) -> list[tuple[str, str, object, int, str | None]]:
    """(what, path, body (bytes are sent raw), status, param) for every kind of bad request."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("malformed JSON", chat, b'{"model": ', 400, None),
        ("empty body", comp, b"", 400, None),
        ("not UTF-8", comp, b'{"model": "\xff\xfe"}', 400, None),
        ("nested 50k deep", comp, b"[" * 50_000, 400, None),
        ("JSON array", comp, [1, 2], 400, None),
        ("unknown field", comp, {"model": mid, "prompt": "x", "colour": "red"}, 400, "colour"),
        ("unknown message field", chat, {"model": mid, "messages": [{"role": "user", "content": "x", "x": 1}]},
         400, "messages.0.x"),
        ("missing messages", chat, {"model": mid}, 400, "messages"),
        ("missing model", comp, {"prompt": "x"}, 400, "model"),
        ("empty messages", chat, {"model": mid, "messages": []}, 400, "messages"),
        ("bad role", chat, {"model": mid, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("content a number", chat, {"model": mid, "messages": [{"role": "user", "content": 3}]}, 400,
         "messages.0.content"),
        ("image part", chat, {"model": mid, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0.content"),
        ("temperature 5", comp, {"model": mid, "prompt": "x", "temperature": 5}, 400, "temperature"),
        ("temperature a string", comp, {"model": mid, "prompt": "x", "temperature": "0.5"}, 400, "temperature"),
        ("top_p 0", comp, {"model": mid, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("max_tokens 0", comp, {"model": mid, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens over the server's", chat, {"model": mid, "messages": msgs, "max_tokens": 10_000}, 400,
         "max_tokens"),
        ("max_tokens past the positions", comp, {"model": mid, "prompt": "x" * 195, "max_tokens": 64}, 400,
         "max_tokens"),
        ("prompt too long", comp, {"model": mid, "prompt": "y" * 300}, 400, "prompt"),
        ("chat too long", chat, {"model": mid, "messages": [{"role": "user", "content": "z" * 300}]}, 400,
         "messages"),
        ("n = 2", comp, {"model": mid, "prompt": "x", "n": 2}, 400, "n"),
        ("stream 'yes'", comp, {"model": mid, "prompt": "x", "stream": "yes"}, 400, "stream"),
        ("five stop strings", comp, {"model": mid, "prompt": "x", "stop": list("abcde")}, 400, "stop"),
        ("empty stop string", comp, {"model": mid, "prompt": "x", "stop": ""}, 400, "stop"),
        ("empty prompt", comp, {"model": mid, "prompt": ""}, 400, "prompt"),
        ("two prompts", comp, {"model": mid, "prompt": ["a", "b"]}, 400, "prompt"),
        ("token-id prompt", comp, {"model": mid, "prompt": [1, 2, 3]}, 400, "prompt"),
        ("unsupported logprobs", comp, {"model": mid, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ("seed a float", comp, {"model": mid, "prompt": "x", "seed": 1.5}, 400, "seed"),
        ("unknown model", comp, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("body over the limit", comp, {"model": mid, "prompt": "x" * 70_000}, 413, None),
    ]


def test_every_kind_of_bad_request_is_a_4xx_json_error_and_the_server_keeps_answering(client, url):
    mid = model_id(client)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = bad_requests(mid)
    assert len(cases) >= 20
    for what, path, body, status, param in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + path, content=data, headers=auth, timeout=30)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
        assert "\n" not in err["message"] and err["param"] == param, (what, err)
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404),
                                 ("DELETE", "/v1/models", 405), ("GET", "/v1/models/gpt-4", 404)):
        r = httpx.request(method, url + path, headers=auth)
        assert r.status_code == status and r.json()["error"]["message"], (method, path)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=mid, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert client.completions.create(model=mid, prompt=PROMPT, max_tokens=3).choices[0].text is not None


def test_a_full_queue_answers_503_at_once_and_a_long_wait_times_out(served):
    with serving(served, max_waiting=0, queue_timeout=30) as base, served.lock.writing():  # as if a reload ran
        mid = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        ask = {"model": mid, "prompt": "x", "max_tokens": 2}
        first = threading.Thread(target=httpx.post, args=(base + "/v1/completions",), kwargs={"json": ask})
        first.start()  # admitted; waits for the reload to finish
        deadline = time.time() + 20
        while httpx.get(base + "/health").json()["queue"]["running"] == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(base + "/v1/completions", json=ask)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert r.headers["retry-after"] == "1"
    first.join()
    with serving(served, max_waiting=4, queue_timeout=0.3) as base, served.lock.writing():
        first = threading.Thread(target=httpx.post, args=(base + "/v1/completions",), kwargs={"json": ask})
        first.start()
        while httpx.get(base + "/health").json()["queue"]["running"] == 0:
            time.sleep(0.01)
        r = httpx.post(base + "/v1/completions", json=ask)
        assert r.status_code == 503 and "waited 0.3 s" in r.json()["error"]["message"]
    first.join()


def test_halting_a_generation_stops_it_at_the_next_token(served):
    """What a client leaving mid-stream does (the stream's `finally` sets the halt event)."""
    from agent.generation import Sampling, generate, prompt_ids

    halt, pieces = threading.Event(), []

    def on_text(text):
        pieces.append(text)
        halt.set()

    with served.reading():
        out = generate(served.model, served.tok, prompt_ids(served.tok, PROMPT), Sampling(max_tokens=60), on_text,
                       halt)
        full = generate(served.model, served.tok, prompt_ids(served.tok, PROMPT), Sampling(max_tokens=60),
                        lambda _t: None)
    assert out.completion_tokens <= 2 < full.completion_tokens and out.text == "".join(pieces)


def test_requests_generated_together_answer_as_each_does_alone(served):
    """The worker batches waiting requests (left-padded, one forward per token): each must get the text, token count
    and finish reason it gets alone, ending on its own max_tokens, stop string or end of sequence."""
    from agent.generation import Row, Sampling, generate, generate_batch, prompt_ids

    berlin = "Berlin is the capital city of the country"
    with served.reading():
        free = generate(served.model, served.tok, prompt_ids(served.tok, berlin), Sampling(20), lambda _t: None).text
    assert len(free) > 6
    asks = [(PROMPT, Sampling(max_tokens=12)), ("Rome", Sampling(max_tokens=3)),
            (berlin, Sampling(max_tokens=20, stop=(free[4:6],))), (LIVE, Sampling(8))]
    with served.reading():
        alone = [generate(served.model, served.tok, prompt_ids(served.tok, p), s, lambda _t: None) for p, s in asks]
        pieces: list[list[str]] = [[] for _ in asks]
        together = generate_batch(served.model, served.tok, [Row(prompt_ids(served.tok, p), s, pieces[i].append)
                                                             for i, (p, s) in enumerate(asks)])
    assert together == alone
    assert ["".join(p) for p in pieces] == [o.text for o in alone]
    assert [o.completion_tokens for o in alone][:2] == [12, 3]
    assert alone[2].finish_reason == "stop" and alone[2].text == free[:free.index(free[4:6])]


def test_a_cancelled_generation_is_preempted_unless_every_row_had_ended(served):
    from agent.generation import Preempted, Row, Sampling, generate_batch, prompt_ids

    ids = prompt_ids(served.tok, PROMPT)
    cancel = threading.Event()
    with served.reading():
        whole = generate_batch(served.model, served.tok, [Row(ids, Sampling(max_tokens=5), lambda _t: None)], cancel)
        cancel.set()
        with pytest.raises(Preempted):
            generate_batch(served.model, served.tok, [Row(ids, Sampling(max_tokens=5), lambda _t: None)], cancel)
    assert whole[0].completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_a_reload_preempts_a_generation_that_sent_nothing_and_waits_for_a_streamed_one(served, monkeypatch, stream):
    """A reload waiting on a generation in flight: a request not streamed runs again from its prompt under the new
    edits (the response names the new batch, its text is whole), a streamed one finishes on the edits it began with.
    The test holds the generation until the reload has begun (wrapping `generate_batch`, which it then calls as it
    is) so that the reload surely meets it in flight; the reload here swaps only the served state's batch number."""
    import agent.serve
    from dataclasses import replace

    real, started, go, calls = agent.serve.generate_batch, threading.Event(), threading.Event(), []

    def held(model, tok, rows, cancel=None):
        calls.append(cancel)
        if len(calls) == 1:
            started.set()
            assert go.wait(20)
        return real(model, tok, rows, cancel)

    monkeypatch.setattr(agent.serve, "generate_batch", held)
    before = served.state
    ask = {"model": served.loaded.name, "prompt": PROMPT, "max_tokens": 6, "stream": stream}
    with serving(served) as base:
        ask["model"] = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        answer = {}
        asker = threading.Thread(target=lambda: answer.update(r=httpx.post(base + "/v1/completions", json=ask,
                                                                             timeout=60)))
        asker.start()
        assert started.wait(20)
        served.preempt.set()  # what ServedModel._load does before it takes the write lock
        go.set()
        with served.lock.writing():
            served.state = replace(before, committed=before.committed + (999,))
        served.preempt.clear()
        asker.join(60)
    with served.lock.writing():
        served.state = before
    r = answer["r"]
    assert r.status_code == 200
    expected = str(before.batch) if stream else "999"
    assert r.headers["x-kagent-batch"] == expected
    if stream:
        assert len(calls) == 1 and calls[0] is None  # a streamed batch is never cancelled
    else:
        assert len(calls) == 2 and r.json()["usage"]["completion_tokens"] == 6


def test_concurrent_clients_share_generations_and_get_their_own_answers(url, client):
    mid = model_id(client)
    prompts = [PROMPT, "Rome", LIVE, "Berlin is", PROMPT, "Rome"]
    alone = [client.completions.create(model=mid, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.completions.create(model=mid, prompt=p, max_tokens=6)
                                 .choices[0].text, prompts))
    assert together == alone


def test_the_serve_command_answers_then_stops_on_sigint_and_a_taken_port_is_one_line(ws, shared_home):
    """`kagent serve` as users start it: generations on the main thread, HTTP on another; Ctrl-C finishes the
    request in flight and exits 0; a port already taken exits 1 with one line."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "agent", "serve", "--workspace", str(ws.root), "--port", str(port)]
    env = os.environ | {"KAGENT_HOME": str(shared_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
            try:
                mid = httpx.get(base + "/v1/models").json()["data"][0]["id"]
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        pending = ThreadPoolExecutor(1).submit(httpx.post, base + "/v1/completions", timeout=60,
                                               json={"model": mid, "prompt": PROMPT, "max_tokens": 40})
        time.sleep(0.3)  # the request is in flight
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith(
            f"kagent serve: the server could not start on 127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        assert pending.result().status_code == 200
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def wait_for_batch(url: str, batch: int, within: float = 5.0) -> float:
    """Seconds until /health names `batch` (fails after `within`)."""
    start = time.time()
    while time.time() - start < within:
        if httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()["batch"] == batch:
            return time.time() - start
        time.sleep(0.05)
    raise AssertionError(f"/health did not name batch {batch} within {within} s")


def served_answer(client, mid: str) -> tuple[int, str]:
    raw = client.completions.with_raw_response.create(model=mid, prompt=LIVE, max_tokens=12)
    return int(raw.headers["x-kagent-batch"]), raw.parse().choices[0].text


def newest_batch(ws: Workspace) -> int:
    with Ledger(ws.ledger_dir) as ledger:
        return max((b.id for b in ledger.history() if b.status == "committed"), default=0)


def commit_strong_edit(ws: Workspace, model, tok) -> int:
    """Commit, as another writer would, a batch whose edits surely move a random model's answer: a random weight
    delta on the tracked layers and, for "Paris", a slot along the (tied) output embedding of "Q", so large that the
    next token is "Q" (watch's own slots barely move a tiny random model)."""
    from conftest import rand_delta
    from editors.delta import EditDelta
    from editors.entity_memory import MemoryWrite
    from memory.record import FactRecord

    with Ledger(ws.ledger_dir) as ledger:
        layer = max(ws.config().layers)  # the memory lives at the last edited layer on models without a table entry
        fact = ledger.add_facts([FactRecord(subject="Paris", prompt="{} is the capital of", target="Peru")])[0]
        q = model.get_input_embeddings().weight[tok.convert_tokens_to_ids("Q")]
        slot = MemoryWrite(layer, ["Paris"], (1e4 * q / q.norm()).unsqueeze(0))
        delta = EditDelta(rand_delta(model, ledger.tracked_layers(), seed=5).layers, slot)
        return ledger.commit([fact], delta, {})


def test_commits_and_rollbacks_by_other_processes_go_live_without_a_restart(client, url, ws, served):
    mid = model_id(client)
    batch, base = served_answer(client, mid)
    assert batch == 0
    feed = ws.root.parent / "feed.jsonl"
    feed.write_text(json.dumps({"subject": "Paris", "prompt": "{} is the capital of", "target": "Spain"}) + "\n")
    res = run("watch", feed, "--once", "--batch-size", "1", "--workspace", ws.root)  # in-process, its own ledger
    assert res.exit_code == 0, res.output
    watched = newest_batch(ws)
    assert watched > 0 and wait_for_batch(url, watched) < 5.0
    health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    committed = health["facts"].get("applied", 0) + health["facts"].get("failed", 0)  # a random model may not answer
    assert committed == 1 and health["tiers"]["memory"]["slots"] == 1
    assert served_answer(client, mid) == (watched, reference(ws, LIVE, 12))

    strong = commit_strong_edit(ws, served.model, served.tok)
    assert wait_for_batch(url, strong) < 5.0
    batch, text = served_answer(client, mid)
    assert (batch, text) == (strong, reference(ws, LIVE, 12)) and text.startswith("Q") and not base.startswith("Q")

    res = run("rollback", "--to", "0", "--workspace", ws.root)
    assert res.exit_code == 0, res.output
    wait_for_batch(url, 0)
    assert served_answer(client, mid) == (0, base)


def test_a_reload_that_fails_keeps_the_state_served_and_says_so(ws, tmp_path, shared_home):
    import shutil

    copy = Workspace.open(shutil.copytree(ws.root, tmp_path / "ws"))
    served = ServedModel.open(copy)  # no poller: refresh() by hand
    try:
        before = served.state
        batch = commit_strong_edit(copy, served.model, served.tok)
        with Ledger(copy.ledger_dir) as ledger:
            ledger.blobs.path("deltas", ledger.batch(batch).delta_hash).unlink()  # a damaged ledger
        assert served.refresh() is False and served.state == before
        assert "is missing" in served.reload_error
        with serving(served) as base:
            health = httpx.get(base + "/health").json()
            assert health["status"] == "stale" and health["batch"] == before.batch and health["reload_error"]
            r = httpx.post(base + "/v1/completions", json={"model": health["model"], "prompt": LIVE, "max_tokens": 3})
            assert r.status_code == 200 and r.headers["x-kagent-batch"] == str(before.batch)
    finally:
        served.close()


def test_the_write_lock_waits_for_readers_and_stops_new_ones():
    lock, order = RWLock(), []
    lock.acquire_read()

    def writer():
        with lock.writing():
            order.append("write")

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.1)
    assert order == []  # a generation is running: the reload waits
    reader = threading.Thread(target=lambda: (lock.acquire_read(), order.append("read"), lock.release_read()))
    reader.start()
    time.sleep(0.1)
    assert order == []  # a waiting reload goes before new generations
    lock.release_read()
    t.join(5)
    reader.join(5)
    assert order == ["write", "read"]


def test_serve_refuses_a_workspace_built_on_another_model(ws, tmp_path):
    other = tmp_path / "other"
    tok = toy_tokenizer()
    make_tiny_llama(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    cfg = ws.config()
    loaded = load_model(str(other), **cfg.load_options())
    from memory.ledger import LedgerMismatch
    with pytest.raises(LedgerMismatch, match="not the base model"):
        ServedModel.open(ws, loaded=loaded)


def test_the_cli_command_is_registered_and_says_what_it_serves():
    res = run("serve", "--help")
    assert res.exit_code == 0 and "--api-key" in res.output and "127.0.0.1" in res.output
    res = run("serve", "--workspace", Path("/nonexistent/ws"))
    assert res.exit_code == 1 and "no workspace" in res.output
