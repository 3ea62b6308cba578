"""`kagent serve`: the edited model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn, server-sent events for
streaming), answering with each fact as soon as `kagent watch` commits it.

Endpoints: `POST /v1/chat/completions` (the model's own chat template), `POST /v1/completions`, `GET /v1/models`,
`GET /health`. Every generated response names the committed batch it was generated with, in the `X-Kagent-Batch`
header and in `system_fingerprint` ("kagent-b12"); agent/served.py keeps the model on the ledger's committed edits.

Safe by default: it binds 127.0.0.1; with an API key every request needs `Authorization: Bearer KEY` (401 without);
a bad request (malformed JSON, unknown fields, wrong types, over-long prompts, bad parameters, a body over
`max_body_bytes`) is a 4xx in OpenAI's error shape (agent/serve_api.py), and an unexpected failure is a 500 of the
same shape that leaves the server answering. One worker generates: the requests waiting when it is free (up to
`max_batch` that share a sampler) go through the model together, left-padded, each ending on its own; at most
`max_waiting` requests wait, each at most `queue_timeout` seconds; beyond either the answer is 503 at once, so a burst
cannot pile up memory.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from agent.generation import (NoChatTemplate, Outcome, Preempted, Row, Sampling, chat_ids, compatible, generate_batch,
                              prompt_ids)
from agent.serve_api import (ApiError, ChatRequest, CompletionRequest, chat_choice, chat_delta, envelope, error_body,
                             new_id, parse, sse, text_choice, usage)
from agent.served import ServedModel, State
from editors.models import context_length

log = logging.getLogger(__name__)

BATCH_HEADER = "X-Kagent-Batch"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # address to bind (loopback: only this machine can reach it)
    port: int = 8000  # TCP port
    api_key: str | None = None  # bearer token every request must carry (None: no auth)
    max_tokens: int = 256  # most new tokens a request may ask for (and the chat default)
    max_prompt_tokens: int = 2048  # most prompt tokens (chat template applied), also capped by the model's positions
    max_waiting: int = 16  # requests waiting for the generator at most; more get 503
    max_batch: int = 8  # requests generated together at most (one forward pass per token for all of them) at once
    queue_timeout: float = 60.0  # seconds a request waits for the generator before 503
    poll_s: float = 0.5  # seconds between looks at the ledger for new commits
    max_body_bytes: int = 1 << 20  # request bodies over this get 413


class Busy(ApiError):
    def __init__(self, message: str):
        super().__init__(503, message, code="server_busy", kind="server_error", headers={"Retry-After": "1"})


class Run:
    """One request's generation as the event loop sees it: ("start", State), ("text", str) pieces, then ("done",
    Outcome) or ("error", message), put from the worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.halt = loop, asyncio.Queue(), threading.Event()

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.halt.set()

    def text(self, piece: str) -> None:
        self.emit("text", piece)


def _unsent(_piece: str) -> None:
    """Where a job that is not streamed sends its text as it comes: nowhere (its Outcome holds the text)."""


@dataclass
class Job:
    """A request waiting for the generator."""

    ids: list[int]  # prompt token ids
    sampling: Sampling
    run: Run
    stream: bool = False  # its text goes to the client as it comes (so it cannot be generated again)
    taken: bool = False  # the worker has taken it into a batch


class Engine:
    """Admission (at most `max_waiting` waiting, each at most `queue_timeout` s) and the worker thread, which
    generates up to `max_batch` waiting requests together (the first waiting and those that can share its sampler),
    all under one committed state."""

    def __init__(self, served: ServedModel, opts: ServeOptions, thread: bool = True):
        """With `thread`, the worker runs on a thread of its own; without, the caller runs `work()` (run_server does,
        on the main thread)."""
        self.served, self.opts = served, opts
        self.queue: deque[Job] = deque()
        self.cv = threading.Condition()
        self.running = 0  # requests in the generation now
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="kagent-generate", daemon=True) if thread else None
        if self.worker is not None:
            self.worker.start()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def start(self, ids: list[int], sampling: Sampling, stream: bool = False) -> tuple[Run, State]:
        """Queue a generation (503 when too many wait or it waits too long) and return it, once started (a streamed
        one) or done (one that is not), with the committed state it runs under."""
        run = Run(asyncio.get_running_loop())
        job = Job(ids, sampling, run, stream)
        with self.cv:
            if (self.running or self.queue) and len(self.queue) >= self.opts.max_waiting:
                raise Busy(f"{len(self.queue)} requests are already waiting (--max-waiting {self.opts.max_waiting});"
                           " retry later")
            self.queue.append(job)
            self.cv.notify()
        try:
            kind, value = await asyncio.wait_for(run.events.get(), self.opts.queue_timeout)
        except TimeoutError:
            with self.cv:
                if not job.taken:
                    self.queue.remove(job)
                    raise Busy(f"waited {self.opts.queue_timeout:g} s for the generator (--queue-timeout); retry "
                               "later") from None
            kind, value = await run.events.get()  # taken just as the wait ran out: it starts now
        if kind == "error":
            raise ApiError(500, value, kind="server_error", code="generation_failed")
        return run, value

    def _take(self) -> list[Job]:
        """The first waiting job and the next ones that can share its generation (under the lock)."""
        first = self.queue.popleft()
        jobs = [first] + [j for j in self.queue if compatible(first.sampling, j.sampling)][: self.opts.max_batch - 1]
        for job in jobs[1:]:
            self.queue.remove(job)
        for job in jobs:
            job.taken = True
        self.running = len(jobs)
        return jobs

    def work(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Generate what waits until `close()` (or until `alive()` turns false while nothing waits)."""
        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    if not alive():
                        return
                    self.cv.wait(0.5)
                if self.closed:
                    return
                jobs = self._take()
            try:
                self._generate(jobs)
            finally:
                self.running = 0

    def _generate(self, jobs: list[Job]) -> None:
        """Generate `jobs` under one committed state. A batch with no streamed job gives way to a reload (its jobs
        go back to the front of the queue and run again under the new edits, so a committed fact is served without
        waiting for a whole batch on the old edits); a streamed job's text has gone out, so its batch finishes."""
        cancel = None if any(j.stream for j in jobs) else self.served.preempt
        try:
            with self.served.reading() as state:
                for job in jobs:
                    if job.stream:
                        job.run.emit("start", state)
                rows = [Row(j.ids, j.sampling, j.run.text if j.stream else _unsent, j.run.halt) for j in jobs]
                outs = generate_batch(self.served.model, self.served.tok, rows, cancel)
            for job, out in zip(jobs, outs):
                if not job.stream:
                    job.run.emit("start", state)
                job.run.emit("done", out)
        except Preempted:
            self._requeue(jobs)
        except Exception as exc:  # a failed generation answers its requests only; the server goes on
            log.exception("serve: generation failed")
            for job in jobs:
                job.run.emit("error", f"generation failed: {type(exc).__name__}: {exc}")

    def _requeue(self, jobs: list[Job]) -> None:
        """`jobs` (none streamed) back at the front of the queue, in order, to run again from their prompts."""
        log.info("serve: %d request(s) give way to a reload and run again under the new edits", len(jobs))
        with self.cv:
            for job in reversed(jobs):
                job.run.halt = threading.Event()  # set by its row's end in the generation that was cut short
                self.queue.appendleft(job)
            self.cv.notify()

    def close(self) -> None:
        """Stop the worker after the generation in progress; requests still waiting get an error."""
        with self.cv:
            self.closed = True
            left = list(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        for job in left:
            job.run.emit("error", "the server is shutting down")
        if self.worker is not None:
            self.worker.join(timeout=30)


def check_key(opts: ServeOptions):
    """A dependency: the bearer token must equal `opts.api_key` (compared in constant time)."""
    async def check(request: Request) -> None:
        if opts.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over `limit` bytes (announced or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {limit}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


class Service:
    """What the routes do: check a request, turn it into prompt ids and sampling, run it, shape the answer."""

    def __init__(self, served: ServedModel, opts: ServeOptions, worker_thread: bool = True):
        self.served, self.opts, self.engine = served, opts, Engine(served, opts, worker_thread)
        self.model_id = served.loaded.name
        self.positions = context_length(served.model.config)
        self.started = time.time()

    def sampling(self, req, default_tokens: int, prompt_tokens: int) -> Sampling:
        wanted = req.requested_tokens()
        tokens = min(default_tokens, self.opts.max_tokens) if wanted is None else wanted
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if tokens > self.opts.max_tokens:
            raise ApiError(400, f"{field} = {tokens} is over this server's limit of {self.opts.max_tokens} "
                           "(kagent serve --max-tokens)", param=field, code="invalid_value")
        room = self.positions - 1 if self.positions else self.opts.max_prompt_tokens  # one position left to answer in
        limit = min(self.opts.max_prompt_tokens, room)
        if prompt_tokens > limit:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens, over the limit of {limit} (kagent serve "
                           "--max-prompt-tokens, and the model's positions)", param="messages"
                           if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        if self.positions and prompt_tokens + tokens > self.positions:
            if wanted is not None:
                raise ApiError(400, f"{prompt_tokens} prompt tokens + {field} {tokens} exceed the model's "
                               f"{self.positions} positions", param=field, code="context_length_exceeded")
            tokens = self.positions - prompt_tokens
        return Sampling(tokens, req.temperature or 0.0, 1.0 if req.top_p is None else req.top_p, req.stops(), req.seed)

    def check_model(self, req) -> None:
        if req.model != self.model_id:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{self.model_id}' "
                           "(GET /v1/models)", param="model", code="model_not_found")

    async def chat(self, req: ChatRequest):
        self.check_model(req)
        try:
            ids = chat_ids(self.served.tok, [m.for_template() for m in req.messages])
        except NoChatTemplate as exc:
            raise ApiError(400, str(exc), param="messages", code="no_chat_template") from None
        sampling = self.sampling(req, self.opts.max_tokens, len(ids))
        return await self.respond(req, ids, sampling, "chat.completion", "chatcmpl")

    async def complete(self, req: CompletionRequest):
        self.check_model(req)
        ids = prompt_ids(self.served.tok, req.text())
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", param="prompt", code="invalid_value")
        sampling = self.sampling(req, 16, len(ids))  # OpenAI's default max_tokens for completions
        return await self.respond(req, ids, sampling, "text_completion", "cmpl")

    async def respond(self, req, ids: list[int], sampling: Sampling, kind: str, prefix: str):
        run, state = await self.engine.start(ids, sampling, stream=bool(req.stream))
        headers = {BATCH_HEADER: str(state.batch)}
        shape = Shape(kind, new_id(prefix), self.model_id, state.batch)
        if req.stream:
            return StreamingResponse(shape.stream(run, req.include_usage()), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = await finished(run)
        return JSONResponse(shape.whole(out), headers=headers)

    def health(self) -> dict:
        state = self.served.state
        return {"status": "ok" if self.served.reload_error is None else "stale", **self.served.describe(),
                "batch": state.batch, "committed_batches": len(state.committed), "facts": state.facts,
                "tiers": {"facts": state.tiers, "memory": {"slots": state.slots, "layer": state.memory_layer}},
                "loaded_at": state.loaded_at, "reload_error": self.served.reload_error,
                "queue": {"running": self.engine.running, "waiting": self.engine.waiting,
                          "max_waiting": self.opts.max_waiting},
                "uptime_s": round(time.time() - self.started, 1)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": int(self.started),
                                            "owned_by": "kagent"}]}


async def finished(run: Run) -> Outcome:
    """Wait for the end of `run` (its text pieces are in the Outcome)."""
    while True:
        kind, value = await run.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise ApiError(500, value, kind="server_error", code="generation_failed")


@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects for one generation."""

    kind: str  # "chat.completion" or "text_completion"
    rid: str
    model: str
    batch: int

    def whole(self, out: Outcome) -> dict:
        choice = chat_choice if self.kind == "chat.completion" else text_choice
        return envelope(self.kind, self.rid, self.model, self.batch, [choice(out.text, out.finish_reason)]) | \
            {"usage": usage(out.prompt_tokens, out.completion_tokens)}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.kind == "chat.completion":
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            return envelope("chat.completion.chunk", self.rid, self.model, self.batch, [chat_delta(delta, finish)])
        return envelope("text_completion", self.rid, self.model, self.batch, [text_choice(text or "", finish)])

    async def stream(self, run: Run, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            if self.kind == "chat.completion":
                yield sse(self.chunk(None, None, first=True))
            while True:
                kind, value = await run.events.get()
                if kind == "text":
                    yield sse(self.chunk(value, None))
                elif kind == "error":
                    yield sse(error_body(value, "server_error", code="generation_failed"))
                    break
                else:
                    yield sse(self.chunk(None, value.finish_reason))
                    if include_usage:
                        yield sse(envelope(self.kind + ("" if self.kind == "text_completion" else ".chunk"),
                                           self.rid, self.model, self.batch, []) |
                                  {"usage": usage(value.prompt_tokens, value.completion_tokens)})
                    break
            yield sse("[DONE]")
        finally:
            run.halt.set()  # the client went away (or the stream ended): stop generating


def create_app(served: ServedModel, opts: ServeOptions, poll: bool = True, worker_thread: bool = True) -> FastAPI:
    """The ASGI app over `served`; with `poll`, its lifespan runs the ledger poller; without `worker_thread`, the
    caller runs `app.state.service.engine.work()`."""
    service = Service(served, opts, worker_thread)

    @asynccontextmanager
    async def lifespan(_app):
        if poll:
            served.start()
        try:
            yield
        finally:
            if poll:
                served.stop()
            service.engine.close()

    app = FastAPI(title="kagent serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key(opts))])
    app.state.service = service
    add_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat(parse(ChatRequest, await read_body(request, opts.max_body_bytes)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.complete(parse(CompletionRequest, await read_body(request, opts.max_body_bytes)))

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_id:
            raise ApiError(404, f"model '{model_id}' is not served here", param="model", code="model_not_found")
        return service.models()["data"][0]

    @app.get("/health")
    async def health():
        body = service.health()
        return JSONResponse(body, headers={BATCH_HEADER: str(body["batch"])})

    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):  # unknown path (404), wrong method (405)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "no such endpoint; this server has /v1/chat/completions, /v1/completions, /v1/models and "
                   "/health", 405: "method not allowed on this endpoint"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("serve: unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def run_server(served: ServedModel, opts: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn then finishes the requests in flight; a second Ctrl-C leaves at once).
    HTTP runs on a thread and the generations on the main thread: on another thread torch's small matrix products
    (a decode step) ran 2-3x slower here (MKL, 2 cores: 24 tokens in 1.8 s against 1.1 s on the main thread)."""
    import uvicorn

    app = create_app(served, opts, worker_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                                           timeout_graceful_shutdown=10))

    def stop(_signum, _frame) -> None:  # what uvicorn's own handler does on the main thread
        server.force_exit = server.should_exit
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = threading.Thread(target=server.run, name="kagent-http", daemon=True)
    web.start()
    try:
        app.state.service.engine.work(alive=web.is_alive)  # returns when the lifespan closes the engine
        web.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(f"kagent serve: the server could not start on {opts.host}:{opts.port} (see the error above)")
