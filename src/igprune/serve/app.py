"""The HTTP side of `igprune serve`: an OpenAI-compatible FastAPI app over one routed, pruned model.

    POST /v1/completions, /v1/chat/completions   (stream or not)     GET /v1/models, /health, /metrics

A request is tokenized and checked here, routed once by its prompt (for chat: the messages' text,
not the template around it) in a routing thread, queued for its cluster, and answered from the
events its job gets from the generation thread (engine.py). Every response names the cluster that
served it: the `igprune` field ({cluster, blocks_skipped, batch_size}) and x-igprune-* headers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from igprune.dynamic import DynamicPrunedModel
from igprune.files import IGPruneError, append_jsonl
from igprune.serve.engine import FAILED, Job, Overloaded, Sampling, Scheduler, log
from igprune.serve.schemas import APIError, ChatRequest, CompletionRequest
from igprune.texts import chat_prompt, chat_route_text


@dataclass
class ServeSettings:
    max_batch: int = 8  # requests per batch
    max_wait_ms: float = 10.0  # how long a mask's first request waits for company
    max_queue: int = 64  # requests admitted and not started; more get 429
    request_timeout: float = 300.0  # seconds from arrival to the last token; then 504
    max_tokens: int = 256  # default for chat when a request gives none (completions: 16, as OpenAI)
    mix_masks: bool = True  # a batch fills its free places with requests of other masks (serve/engine.py)
    request_log: str | None = None  # a JSONL file each answered request is appended to, as `fit --texts` reads it


class RequestMetrics:
    """Per-request Prometheus metrics, the same for every engine, in a registry of the app's own (several apps can
    share a process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("igprune_requests", "Requests answered", ["endpoint", "cluster", "status"], registry=r)
        self.prompt_tokens = Counter("igprune_prompt_tokens", "Prompt tokens", ["cluster"], registry=r)
        self.completion_tokens = Counter("igprune_completion_tokens", "Generated tokens", ["cluster"], registry=r)
        self.latency = Histogram("igprune_request_latency_seconds", "Arrival to last token", ["cluster"], registry=r)
        self.ttft = Histogram("igprune_time_to_first_token_seconds", "Arrival to first text", ["cluster"], registry=r)
        self.route = Histogram("igprune_route_seconds", "Arrival to routed: the wait for the routing thread, the "
                               "encoder and the nearest centroid", registry=r,
                               buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))


class Metrics(RequestMetrics):
    """The request metrics and the HF engine's own: queues and batches."""

    def __init__(self, scheduler: Scheduler):
        super().__init__()
        r = self.registry
        self.queue_wait = Histogram("igprune_queue_wait_seconds", "Queued until its batch started", ["cluster"],
                                    registry=r)
        # per distinct mask (clusters with equal masks share one), or "mixed" for a batch of several masks
        self.batch_size = Histogram("igprune_batch_size", "Requests per batch", ["mask"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens_per_s = Gauge("igprune_tokens_per_second", "Generated tokens/s of the last batch", ["mask"],
                                  registry=r)
        self.batch_masks = Histogram("igprune_batch_masks", "Distinct masks per batch", registry=r,
                                     buckets=(1, 2, 4, 8, 16))
        depth = Gauge("igprune_queue_depth", "Requests waiting per cluster", ["cluster"], registry=r)
        for k in range(scheduler.n_clusters):
            depth.labels(cluster=str(k)).set_function(lambda k=k: scheduler.depth(k))
        Gauge("igprune_admitted_waiting", "Requests admitted, not started", registry=r).set_function(scheduler.depth)

    def batch(self, queues: list[int], size: int, tokens: int, seconds: float) -> None:
        label = str(queues[0]) if len(queues) == 1 else "mixed"
        self.batch_size.labels(mask=label).observe(size)
        self.tokens_per_s.labels(mask=label).set(tokens / max(seconds, 1e-9))
        self.batch_masks.observe(len(queues))


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _field(part: str | int) -> bool:
    """Whether a part of a validation error's loc names a field or an index, not "body" or a union's member
    ("function-after[...]", "list[str]", "int")."""
    return isinstance(part, int) or (part.isidentifier() and part not in ("body", "str", "int", "bool", "float"))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-style error bodies for every failure; shared by the HF and the llama.cpp front ends."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if errors[0].get("type") == "json_invalid":  # its loc is a character position, not a field
            why, where = errors[0].get("ctx", {}).get("error", "invalid"), errors[0].get("loc", ())[-1:]
            at = f" at character {where[0]}" if where else ""
            return _error(APIError(400, f"the body is not valid JSON ({why}{at}); send one JSON object"))
        # of a union's failures, the one that got deepest into the value: a list prompt's bad item, not "not a string"
        first = max(errors, key=lambda e: len(e.get("loc", ())))
        param = ".".join(str(p) for p in first.get("loc", ()) if _field(p)) or None
        return _error(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        """A bug: the client gets an id to quote, the log the traceback (which may name files and values)."""
        rid = f"req-{uuid.uuid4().hex}"
        log.error("request %s to %s failed", rid, request.url.path, exc_info=err)
        return _error(APIError(500, FAILED.format(rid=rid), type="server_error", code="internal_error",
                               headers={"x-request-id": rid}))


def add_info_routes(app: FastAPI, name: str, metrics: RequestMetrics) -> None:
    """/metrics and /v1/models, the same for every engine."""
    created = int(time.time())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "igprune"}]}


def check_request(body: CompletionRequest | ChatRequest, name: str) -> None:
    """The request names the served model and asks nothing igprune does not do."""
    if body.model != name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {name!r}",
                       param="model", code="model_not_found", type="not_found_error")
    if (field := body.unsupported()) is not None:
        raise APIError(400, f"{field} is not supported by igprune serve; leave it at its default", param=field)


def completion_input(tokenizer: Any, body: CompletionRequest) -> tuple[list[int], str]:
    """A completion's token ids and the text it is routed by (its prompt)."""
    prompt = body.text()
    if not prompt.strip():
        raise APIError(400, "empty prompt: give some text to generate from", param="prompt")
    return tokenizer(prompt).input_ids, prompt


def chat_input(tokenizer: Any, body: ChatRequest, name: str) -> tuple[list[int], str, list[dict]]:
    """A chat's token ids (the chat template over its messages), the text it is routed by, and its messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {name!r} has no chat template; use /v1/completions", param="messages",
                       code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = chat_prompt(tokenizer, messages)
    except IGPruneError as err:
        raise APIError(400, str(err), param="messages") from err
    route_text = chat_route_text(messages)
    if not route_text:
        raise APIError(400, "empty messages: give some text to generate from", param="messages")
    return tokenizer(text, add_special_tokens=False).input_ids, route_text, messages


def create_app(dynamic: DynamicPrunedModel, name: str, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving `dynamic` as model `name`; its scheduler thread runs while the app is up."""
    settings = settings or ServeSettings()
    scheduler = Scheduler(dynamic, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                          settings.mix_masks)
    metrics = Metrics(scheduler)
    scheduler.on_batch = metrics.batch
    tokenizer = dynamic.tokenizer
    context = getattr(dynamic.model.config, "max_position_embeddings", None)
    skipped = [int((~dynamic.mask_for(k)).sum()) for k in range(scheduler.n_clusters)]
    router = ThreadPoolExecutor(1, thread_name_prefix="igprune-route")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()
        router.shutdown(wait=False)

    app = FastAPI(title="igprune serve", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "clusters": scheduler.n_clusters, "waiting": scheduler.depth()}

    add_info_routes(app, name, metrics)

    def sampling(body: CompletionRequest | ChatRequest, prompt_ids: list[int], default_tokens: int) -> Sampling:
        if not prompt_ids:
            raise APIError(400, "empty prompt: give some text to generate from", param="prompt")
        room = None if context is None else context - len(prompt_ids)
        max_tokens = body.max_tokens or (default_tokens if room is None else max(1, min(default_tokens, room)))
        if room is not None and max_tokens > room:
            raise APIError(400, f"the prompt's {len(prompt_ids)} tokens and max_tokens={max_tokens} exceed the "
                           f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens",
                           param="max_tokens", code="context_length_exceeded")
        return Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stops())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        check_request(body, name)
        ids, prompt = completion_input(tokenizer, body)
        return await answer("completions", body, ids, prompt, sampling(body, ids, 16), {"prompt": prompt})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        check_request(body, name)
        ids, route_text, messages = chat_input(tokenizer, body, name)
        return await answer("chat", body, ids, route_text, sampling(body, ids, settings.max_tokens),
                            {"messages": messages})

    async def answer(endpoint: str, body: CompletionRequest | ChatRequest, ids: list[int], route_text: str,
                     want: Sampling, asked: dict) -> Response:
        """Admit, route, queue; then stream the job's events or collect them into one response. `asked` is the
        request as the log keeps it: {"prompt": ...} or {"messages": [...]}."""
        arrived = time.monotonic()
        try:
            scheduler.admit()
        except Overloaded as err:
            metrics.requests.labels(endpoint, "none", "429").inc()
            raise APIError(429, str(err), type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"}) from err
        loop = asyncio.get_running_loop()
        try:
            cluster = (await loop.run_in_executor(router, dynamic.route, [route_text]))[0].cluster
        except BaseException:
            scheduler.withdraw()
            raise
        metrics.route.observe(time.monotonic() - arrived)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        job = Job(ids, want, cluster, loop, rid)
        scheduler.submit(job)
        label = str(cluster)
        extra = {"cluster": cluster, "blocks_skipped": skipped[cluster]}
        headers = {"x-igprune-cluster": label, "x-igprune-blocks-skipped": str(skipped[cluster]), "x-request-id": rid}
        deadline = arrived + settings.request_timeout
        first: list[float] = []

        async def events() -> AsyncIterator[tuple]:
            """The job's events until it ends; an APIError when it fails or runs out of time."""
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    job.cancel()
                    raise APIError(504, f"request timed out after {settings.request_timeout:g} s", type="timeout",
                                   code="timeout") from None
                if event[0] == "error":
                    raise APIError(event[1], event[2], type="server_error", code="internal_error")
                if event[0] == "delta" and not first:
                    first.append(time.monotonic())
                    metrics.ttft.labels(label).observe(first[0] - arrived)
                yield event
                if event[0] == "done":
                    return

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": len(job.ids),
                    "total_tokens": len(ids) + len(job.ids)}

        def finished(status: str) -> None:
            metrics.requests.labels(endpoint, label, status).inc()
            if status == "200":
                metrics.prompt_tokens.labels(label).inc(len(ids))
                metrics.completion_tokens.labels(label).inc(len(job.ids))
                metrics.latency.labels(label).observe(time.monotonic() - arrived)
                if job.started is not None:
                    metrics.queue_wait.labels(label).observe(job.started - job.enqueued)
                if settings.request_log and job.text.strip():  # a `fit --texts` line: prompt or chat, and the reply
                    reply = ({"response": job.text} if endpoint == "completions" else
                             {"messages": [*asked["messages"], {"role": "assistant", "content": job.text}]})
                    try:
                        append_jsonl(settings.request_log, {**asked, **reply, "igprune": {"model": name, **extra}})
                    except OSError as err:  # the answer stands; the log says why it lacks it
                        warnings.warn(f"could not log a request to {settings.request_log}: {err}", stacklevel=1)

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if endpoint == "completions":
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def envelope(choices: list[dict], chunk: bool) -> dict:
            kind = {"completions": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
            return {"id": rid, "object": kind[endpoint], "created": int(time.time()), "model": name,
                    "choices": choices, "igprune": {**extra, "batch_size": job.batch_size}}

        if not body.stream:
            try:
                async for _ in events():
                    pass
            except APIError as err:
                job.cancel()
                finished(str(err.status))
                return _error(err)
            finished("200")
            return JSONResponse({**envelope([choice(job.text, job.finish, False)], False), "usage": usage()},
                                headers=headers)

        async def stream() -> AsyncIterator[str]:
            status = "499"  # the client went away, unless we get further
            try:
                if endpoint == "chat":
                    yield _sse(envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}], True))
                async for event in events():
                    if event[0] == "delta":
                        yield _sse(envelope([choice(event[1], None, True)], True))
                    else:
                        yield _sse(envelope([choice(None, event[1], True)], True))
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**envelope([], True), "usage": usage()})
                status = "200"
                yield _sse("[DONE]")
            except APIError as err:
                status = str(err.status)
                yield _sse(err.body())
            finally:
                job.cancel()
                finished(status)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app


class BackgroundServer:
    """Serve an app with uvicorn in a thread on 127.0.0.1 and an ephemeral port (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @contextmanager
    def running(self, timeout: float = 30.0) -> Iterator[str]:
        """The base URL while the server is up; started and stopped within `timeout` seconds each."""
        self.thread.start()
        until = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > until or not self.thread.is_alive():
                raise IGPruneError(f"the server did not start within {timeout:g} s")
            time.sleep(0.02)
        try:
            yield self.url
        finally:
            self.server.should_exit = True
            self.thread.join(timeout)
            self.sock.close()


def serve(dynamic: DynamicPrunedModel, name: str, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(dynamic, name, settings), host=host, port=port, log_level="info")
