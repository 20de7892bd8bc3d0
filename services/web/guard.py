"""Who may talk to the page at all: the Host and Origin allow-list, and the security headers of every answer.

DNS rebinding: a page on ``rebind.attacker.example`` whose name is then pointed at 127.0.0.1 is
same-origin with itself, so the browser lets its scripts read this server's answers. They
arrive with ``Host: rebind.attacker.example``; only names in ``web.allowed_hosts`` (default:
the bound address and the localhost names) are answered, before authentication and before any
route. A scripted cross-site request carries an ``Origin``: it must be this page's own origin,
on an allowed name. Health probes stay open: an orchestrator probes by pod IP.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.web.settings import WebOptions

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Pages load only their own scripts (none inline), show only their own images, talk only to this
# server, and cannot be framed (clickjacking the camera admin).
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def host_name(netloc: str) -> str | None:
    """The host of a Host header or an Origin's authority, lower case, without port or brackets."""
    try:
        name = urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


class HostGuard:
    def __init__(self, app: ASGIApp, opts: WebOptions) -> None:
        self.app = app
        self.allowed = opts.hosts_allowed()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = None if scope["path"] in OPEN_PATHS else self.refusal(headers)
        if problem is not None:
            await _refuse(send, *problem)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not self._ok(host_name(host)):
            return 421, f"host {host!r} is not served here: add it to web.allowed_hosts\n"
        origin = headers.get("origin")
        if origin is None:
            return None
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc != host or not self._ok(host_name(parts.netloc)):
            return 403, f"cross-origin request from {origin!r} refused\n"
        return None

    def _ok(self, name: str | None) -> bool:
        return name is not None and ("*" in self.allowed or name in self.allowed)


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
