"""What guards the server below its routes: the Host check that keeps web pages away from a
server on loopback (DNS rebinding)."""

# Why a Host check: a page on evil.example can make a browser send requests to a name that
# resolves to 127.0.0.1 (DNS rebinding); the browser then treats the server's answers as
# evil.example's own. Such a request still says `Host: evil.example`, so a server meant for
# this computer answers only the loopback names (and those given with --allowed-host).

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence

from .errors import UserError
from .openai_api import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
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
