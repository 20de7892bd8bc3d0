"""Optional access control for the page: a bearer token (or its cookie) and/or HTTP basic auth.

Health probes stay open so an orchestrator can check the process without credentials.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from services.web.settings import WebOptions

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
COOKIE = "es_token"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class AuthMiddleware:
    def __init__(self, app: ASGIApp, opts: WebOptions) -> None:
        self.app = app
        self.opts = opts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.opts.auth_required or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query_token = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        if self.opts.token is not None and query_token and _same(query_token, self.opts.token):
            await _set_cookie_and_redirect(local_path(scope["path"]), self.opts.token, send,
                                           secure=self.opts.secure_cookie or scope.get("scheme") == "https")
            return
        if self._allowed(headers):
            await self.app(scope, receive, send)
            return
        await _deny(send, basic=self.opts.basic_user is not None)

    def _allowed(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if self.opts.token is not None:
            if auth.startswith("Bearer ") and _same(auth[7:], self.opts.token):
                return True
            cookie = SimpleCookie(headers.get("cookie", ""))
            if COOKIE in cookie and _same(cookie[COOKIE].value, self.opts.token):
                return True
        if self.opts.basic_user is not None and auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _same(user, self.opts.basic_user) and _same(password, self.opts.basic_password or "")
        return False


def local_path(path: str) -> str:
    """``path`` as a redirect target on this server: ``//evil.example`` or ``/\\evil.example`` would leave it."""
    return "/" + path.lstrip("/\\")


async def _set_cookie_and_redirect(path: str, token: str, send: Send, secure: bool) -> None:
    # The token leaves the address bar at once; the cookie carries it for images and the event feed.
    # Over HTTPS it is Secure, so the browser never sends it over plain HTTP to the same name.
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", path.encode()), (b"set-cookie", cookie.encode()),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _deny(send: Send, basic: bool) -> None:
    body = b"unauthorized: this page needs the token (?token=...) or the basic-auth user\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    if basic:
        headers.append((b"www-authenticate", b'Basic realm="emotion-stream"'))
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
