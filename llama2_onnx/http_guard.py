"""What guards the server around its routes: a time limit on request heads, a cap on open
connections, the Host check that keeps web pages away from a server on loopback, and the
reading of request bodies (JSON only, limited in size and time)."""

# Why a protocol of our own: uvicorn closes an idle keep-alive connection (timeout_keep_alive)
# and bounds a request head's size (h11_max_incomplete_event_size), but a connection that sends
# part of a head, or nothing, stays open for good; enough of them exhaust the process's file
# descriptors, and then nothing (not even /health) is accepted while asyncio logs a traceback
# per failed accept. So each connection gets `header_timeout` seconds, from when it opens or
# its last response ended, to finish its next request's head. (The body has its own limit,
# BODY_TIMEOUT_S.) At most `max_connections` are open: when a new one would pass that,
# the oldest connection still waiting for a head is closed, so idle connections cannot lock
# out a health check; when none waits, the new one gets a 503 and is closed.
#
# A body is read as it arrives, counting bytes (413 the moment it passes MAX_BODY_BYTES, also
# for `Transfer-Encoding: chunked`), within `body_timeout` (408); a client that leaves while
# sending it costs one log line. 413 and 408 close the connection, so its rest is never read.

# Why a Host check: a page on evil.example can make a browser send requests to a name that
# resolves to 127.0.0.1 (DNS rebinding); the browser then treats the server's answers as
# evil.example's own. Such a request still says `Host: evil.example`, so a server meant for
# this computer answers only the loopback names (and those given with --allowed-host).

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import Sequence

from .errors import UserError
from .openai_api import ApiError

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0  # from the end of the head to the end of the body: 8 MiB at 1 Mbit/s
MAX_BODY_BYTES = 8 * 2**20
FD_RESERVE = 64  # file descriptors kept for the model's files, logs and pipes
MAX_CONNECTIONS = 256
WARN_EVERY_S = 60.0  # the "connections are full" warning at most this often
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
log = logging.getLogger("llama2_onnx.server")
_HOST = re.compile(r"([a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(:[0-9]+)?")  # and port


def host_name(header: str) -> str:
    """The name in a Host header, lower-case and without its port ("LocalHost:8000" ->
    "localhost", "[::1]:8000" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.partition(":")[0]


def check_allowed_host(value: str) -> str:
    """An --allowed-host value as the name it allows (a port is ignored).

    Raises:
        UserError: if it is not a host name or address.
    """
    if not _HOST.fullmatch(value.strip().lower()):
        raise UserError(f"--allowed-host {value!r} is not a host name; give the name alone, "
                        "such as llm.example.com or 192.168.1.20.")
    return host_name(value)


def allowed_host_names(bound: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to address `bound` answers, None for any.

    On loopback: the loopback names and `extra`. Elsewhere any name, unless `extra` is given:
    then those, the loopback names and the bound address itself.
    """
    names = frozenset(check_allowed_host(value) for value in extra)
    address = ipaddress.ip_address(bound)
    if address.is_loopback:
        return LOOPBACK_NAMES | names
    if not names:
        return None
    own = set() if address.is_unspecified else {f"[{bound}]" if address.version == 6 else bound}
    return LOOPBACK_NAMES | names | own


class HostCheck:
    """ASGI middleware: a request whose Host is not one of `allowed` gets a 400 in OpenAI's
    shape, before any route (or the API key) sees it."""

    def __init__(self, app, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                await _send_error(send, self._refusal(header))
                return
        await self.app(scope, receive, send)

    def _refusal(self, header: str) -> ApiError:
        names = ", ".join(sorted(self.allowed))
        shown = repr(header[:80]) if header else "(none)"
        return ApiError(400, f"the Host header {shown} is not a name of this server ({names}); "
                        "use one of those, or start the server with --allowed-host NAME to "
                        "add a name that should reach it.", code="invalid_host")


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def require_json(request) -> None:
    """Refuse a body not declared as JSON: what a web page can send to another site without
    asking first (a form, text/plain) never reaches the model."""
    given = request.headers.get("content-type", "")
    if given.partition(";")[0].strip().lower() != "application/json":
        shown = repr(given[:80]) if given else "none"
        raise ApiError(415, f"the request body must be JSON sent with `Content-Type: "
                       f"application/json` (this request's Content-Type: {shown}); set that "
                       "header.", code="unsupported_media_type")


class ClientGone(Exception):
    """The client closed the connection before its request body was read."""


async def read_body(request, timeout: float) -> bytes:
    """The body, counted as it arrives.

    Raises:
        ApiError: 413 as soon as it passes MAX_BODY_BYTES, 408 if it takes over `timeout` s.
        ClientGone: if the client leaves first.
    """
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s; send the "
                       "whole request at once.", code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB; send a "
                    "shorter prompt.", code="request_too_large")


def guarded_protocol(max_connections: int = MAX_CONNECTIONS,
                     header_timeout: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with a header time limit and a cap on open connections (see the
    comment at the top), for `uvicorn.Config(http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict[H11Protocol, None] = {}  # connections waiting for a head, oldest first
    warned = [-WARN_EVERY_S]

    class GuardedProtocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if not waiting:
                    self._refuse()
                    return
                oldest = next(iter(waiting))  # the connection idle longest makes room
                oldest._stop_waiting()
                oldest.transport.close()
            self._wait_for_head()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head arrived
                self._stop_waiting()

        def on_response_complete(self) -> None:
            self._wait_for_head()  # first: a pipelined request's head stops it again
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait_for_head(self) -> None:
            self._stop_waiting()
            waiting[self] = None
            self.head_timer = self.loop.call_later(header_timeout, self.transport.close)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _refuse(self) -> None:
            if time.monotonic() - warned[0] >= WARN_EVERY_S:
                warned[0] = time.monotonic()
                log.warning("%d connections are open, all in requests (--max-connections); "
                            "new ones get 503 until some close", max_connections)
            error = ApiError(503, f"the server has {max_connections} connections open; retry "
                             "shortly.", code="too_many_connections", kind="server_error")
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: "
                                 b"application/json\r\ncontent-length: %d\r\nretry-after: 1"
                                 b"\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return GuardedProtocol


def connection_cap(wanted: int) -> int:
    """`wanted`, raising the process's limit on open files to fit it if need be; less (with a
    warning) if that limit cannot be raised: past it, no connection would be accepted."""
    try:
        import resource
    except ImportError:  # Windows: no such limit for sockets
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    try:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft >= needed:
        return wanted
    cap = max(soft - FD_RESERVE, 1)
    log.warning("--max-connections %d is more than this process may open (%d files); serving "
                "at most %d connections", wanted, soft, cap)
    return cap
