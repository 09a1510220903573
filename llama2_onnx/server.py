"""An OpenAI-compatible HTTP server over one engine (Starlette on uvicorn): /v1/models,
/v1/chat/completions and /v1/completions, streamed as server-sent events or whole."""

# Request path: check the Host (http_guard) -> check the key -> read a JSON body (http_guard)
# -> parse it (openai_api) -> queue a job (scheduler; 503 when full) -> stream its pieces as
# `data: {chunk}` events ending with `data: [DONE]`, or collect them into one JSON response.
# A client that goes away cancels its job: a stream is cancelled by Starlette when the
# connection drops, a whole response by a task that waits for the disconnect. Either way the
# engine stops before its next token.

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .http_guard import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    ClientGone,
    HostCheck,
    allowed_host_names,
    connection_cap,
    guarded_protocol,
    read_body,
    require_json,
)
from .openai_api import (
    ApiError,
    Endpoint,
    GenerationRequest,
    LeadingSpaceFilter,
    chunk_body,
    decode_body,
    finish_reason,
    models_body,
    parse_request,
    response_body,
    usage_chunk_body,
)
from .placement import RunOptions
from .scheduler import Job, QueueFull, Scheduler

if TYPE_CHECKING:
    from .generation import Engine

INSTALL_HINT = ("the server needs Starlette and uvicorn; install them with "
                "`pip install -e .[serve]`.")
API_KEY_ENV = "LLAMA2_ONNX_API_KEY"
KEEPALIVE_S = 5.0  # an SSE comment this often while a stream waits in the queue
log = logging.getLogger("llama2_onnx.server")


@dataclass(frozen=True)
class ServerOptions:
    """What to serve and how."""

    variant: Path
    run: RunOptions = RunOptions()  # where and how the variant runs
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 32
    allowed_hosts: tuple[str, ...] = ()  # Host names to answer besides loopback's
    max_connections: int = MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float = BODY_TIMEOUT_S
    token_delay: float = 0.0  # seconds per text piece; only for tests


@dataclass(frozen=True)
class ApiOptions:
    """How the app answers requests (see create_app)."""

    api_key: str | None = None
    max_queue: int = 32
    allowed_hosts: frozenset[str] | None = None
    body_timeout: float = BODY_TIMEOUT_S
    token_delay: float = 0.0


def check_api_key(key: str | None, source: str = "--api-key") -> str | None:
    """The key as requests must send it: without surrounding whitespace (a file's trailing
    newline, as a Kubernetes Secret made with --from-file has), said in one log line.

    Raises:
        UserError: for an empty key, or one with a character that is not printable ASCII
            (no HTTP client can send it, so no request would ever match).
    """
    if key is None:
        return None
    stripped = key.strip()
    if not stripped:
        raise UserError(f"{source} is empty; give a key, or leave it out for no key.")
    for position, char in enumerate(stripped, 1):
        if not " " <= char <= "~":
            raise UserError(f"the key in {source} has a character that is not printable ASCII "
                            f"(U+{ord(char):04X} at position {position}), which no client can "
                            "send in a header; use letters, digits and punctuation.")
    if stripped != key:
        log.info("the key in %s had whitespace around it (a file's trailing newline?); using "
                 "it without", source)
    return stripped


def import_server_stack():
    """Import starlette and uvicorn, or raise a UserError naming the install command."""
    try:
        import starlette.applications
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return starlette.applications, uvicorn


def create_app(engine: Engine, options: ApiOptions | None = None):
    """The ASGI app serving `engine` under its variant name.

    Args:
        engine: a loaded engine; the app runs one generation on it at a time, or as many as
            it has slots (RunOptions.parallel), decoded together.
        options: `api_key`: if set, every /v1 request needs `Authorization: Bearer <api_key>`;
            `max_queue`: how many requests may wait while every slot is busy (more get 503; 0:
            a request runs only when a slot is free); `allowed_hosts`: the Host names it
            answers (http_guard.allowed_host_names), None: any; `body_timeout`: seconds a body
            may take to arrive (then 408); `token_delay`: seconds to pause per text piece
            (tests only).

    Raises:
        UserError: if Starlette is not installed.
    """
    applications, _ = import_server_stack()
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    options = options or ApiOptions()
    api = OpenAIServer(engine, options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        api.scheduler.close()

    routes = [Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"])]
    guards = [] if options.allowed_hosts is None else [
        Middleware(HostCheck, allowed=options.allowed_hosts)]
    app = applications.Starlette(routes=routes, lifespan=lifespan, middleware=guards,
                                 exception_handlers={HTTPException: _http_error})
    app.state.api = api
    return app


class OpenAIServer:
    """The route handlers, sharing one engine (and its slots) through one scheduler."""

    def __init__(self, engine: Engine, options: ApiOptions) -> None:
        self.engine, self.model, self.body_timeout = engine, engine.name, options.body_timeout
        self.api_key = options.api_key.encode() if options.api_key else None
        self.scheduler = Scheduler(engine, options.max_queue, options.token_delay,
                                   engine.slots)
        self.started = int(time.time())

    async def health(self, request):
        return _json({"status": "ok", "model": self.model, "waiting": self.scheduler.waiting()})

    async def models(self, request):
        try:
            self._authorize(request)
        except ApiError as exc:
            return _error(exc)
        return _json(models_body(self.model, self.started))

    async def chat(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def _generate(self, request, endpoint: Endpoint):
        try:
            self._authorize(request)
            require_json(request)
            body = await read_body(request, self.body_timeout)
            parsed = await asyncio.to_thread(_parse, endpoint, body, self.engine,
                                             self.model)  # big bodies, long prompts: off the loop
            job = self._submit(parsed)
        except ApiError as exc:
            log.info("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
            return _error(exc)
        except ClientGone:
            log.info("%s %s: the client went away before sending its whole request",
                     request.method, request.url.path)
            return _error(ApiError(400, "the request body ended early."))  # nobody reads it
        if parsed.stream:
            return _sse(self._stream(parsed, job), job)
        return await self._whole(request, parsed, job)

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.api_key):
            raise ApiError(401, "the API key is missing or wrong; send the server's key as "
                           "`Authorization: Bearer <key>`.", code="invalid_api_key")

    def _submit(self, parsed: GenerationRequest) -> Job:
        job = Job(parsed.prompt, parsed.sampling, parsed.max_tokens, parsed.stop,
                  asyncio.get_running_loop(), name=f"{parsed.endpoint} {parsed.id}")
        try:
            self.scheduler.submit(job)
        except QueueFull:
            waiting, slots = self.scheduler.max_waiting, self.scheduler.slots
            runs = "one request at a time" if slots == 1 else f"{slots} requests at a time"
            queue = (f"its queue of {waiting} waiting requests is full" if waiting else
                     f"it runs {runs} and --max-queue 0 lets none wait")
            raise ApiError(503, f"the server is busy ({queue}); retry shortly.",
                           code="queue_full", kind="server_error") from None
        return job

    async def _stream(self, parsed: GenerationRequest, job: Job) -> AsyncIterator[str]:
        """SSE events of one job; closing this generator (the client left) cancels the job
        (and so does JobStream, in case it never started)."""
        strip = LeadingSpaceFilter(parsed.endpoint == "chat")
        try:
            if parsed.endpoint == "chat":
                yield _event(chunk_body(parsed, self.model, None, role=True))
            async for kind, value in _batches(job):
                if kind == "idle":
                    yield ": waiting\n\n"  # an SSE comment: keeps proxies from timing out
                elif kind == "piece" and (text := strip.push(value)):
                    yield _event(chunk_body(parsed, self.model, text))
                elif kind == "error":
                    yield _event(_generation_failed(value).body())
                elif kind == "done":
                    yield _event(chunk_body(parsed, self.model, None, finish_reason(value)))
                    if parsed.include_usage:
                        yield _event(usage_chunk_body(parsed, self.model, value))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    async def _whole(self, request, parsed: GenerationRequest, job: Job):
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        strip, pieces = LeadingSpaceFilter(parsed.endpoint == "chat"), []
        try:
            async for kind, value in _batches(job):
                if kind == "piece":
                    pieces.append(strip.push(value))
                elif kind == "error":
                    return _error(_generation_failed(value))
                elif kind == "done":
                    return _json(response_body(parsed, self.model, "".join(pieces), value))
        finally:
            watcher.cancel()
            job.cancel()


async def _batches(job: Job) -> AsyncIterator[tuple[str, object]]:
    """The job's events, ending with "done" or "error". Pieces already queued are joined into
    one (one chunk instead of many when the stream lags behind the model); ("idle", None)
    comes every KEEPALIVE_S while nothing else does."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield "idle", None
            continue
        pieces = [value] if kind == "piece" else []
        while kind == "piece" and not job.events.empty():
            kind, value = job.events.get_nowait()
            if kind == "piece":
                pieces.append(value)
        if pieces:
            yield "piece", "".join(pieces)
        if kind != "piece":
            yield kind, value
            return


async def _http_error(request, exc):
    """Starlette's own refusals (no such path, wrong method) in OpenAI's error shape."""
    return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                           f"{exc.detail}; see GET /v1/models, POST /v1/chat/completions and "
                           "POST /v1/completions."))


async def _cancel_on_disconnect(request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _generation_failed(exc: Exception) -> ApiError:
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {exc}", kind="server_error")


def _parse(endpoint: Endpoint, body: bytes, engine: Engine, model: str) -> GenerationRequest:
    return parse_request(endpoint, decode_body(body), engine, model)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def _error(exc: ApiError):
    response = _json(exc.body(), exc.status)
    if exc.status in (408, 413):  # the rest of the body is not worth reading
        response.headers["Connection"] = "close"
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 503:
        response.headers["Retry-After"] = "1"
    return response


def _sse(events: AsyncIterator[str], job: Job):
    return _job_stream_class()(events, job)


@functools.cache
def _job_stream_class():
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        """Server-sent events that cancel their job however the response ends, also when the
        client leaves before the first event (then the event generator never starts)."""

        def __init__(self, events: AsyncIterator[str], job: Job) -> None:
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    return JobStream


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port); uvicorn listens on it.

    Raises:
        UserError: if the port is out of range or the address cannot be used.
    """
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is invalid; use 1 to 65535 (0 picks a free port).")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                        "another --port or --host.") from None
    return sock


def serve(options: ServerOptions) -> None:
    """Load the variant and serve it until interrupted.

    Raises:
        UserError: for a bad port or address, a variant that cannot be loaded, or a missing
            Starlette/uvicorn.
    """
    _, uvicorn = import_server_stack()
    if options.max_queue < 0:
        raise UserError(f"--max-queue {options.max_queue} is invalid; use 0 or more.")
    if options.max_connections < 1:
        raise UserError(f"--max-connections {options.max_connections} is invalid; use 1 or "
                        "more.")
    sock = listen(options.host, options.port)
    from .generation import Engine

    engine = Engine.from_variant(options.variant, options.run)
    host, port = sock.getsockname()[:2]
    app = create_app(engine, ApiOptions(options.api_key, options.max_queue,
                                        allowed_host_names(host, options.allowed_hosts),
                                        options.body_timeout, options.token_delay))
    if not options.api_key and not _is_loopback(host):
        log.warning("no --api-key: anyone who can reach %s:%d can use the model", host, port)
    protocol = guarded_protocol(connection_cap(options.max_connections),
                                options.header_timeout)
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30)
    slots = f", {engine.slots} slots" if engine.slots > 1 else ""
    _run(uvicorn, config, sock, lambda: log.info(
        "serving %s (%s, context %d%s) at http://%s:%d/v1%s", engine.name,
        engine.runner.provider, engine.context_len, slots, _url_host(host), port,
        " (API key required)" if options.api_key else ""))


def _run(uvicorn, config, sock: socket.socket, ready: Callable[[], None]) -> None:
    """Serve on `sock` until interrupted; `ready()` once it accepts connections (uvicorn calls
    listen() in its startup, after the app's lifespan has started)."""
    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                ready()

    Server(config).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(host).is_loopback


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
