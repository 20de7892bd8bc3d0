"""The one way secrets in URLs are hidden: logs, CLI output, API answers, error strings, ``--check-config``.

A camera or Redis URL may carry credentials in its user info (``rtsp://admin:pw@cam``) or in
its query (``http://cam/video.mjpg?user=admin&password=pw``, signed URLs with ``sig=``). Both
are replaced by ``***``; everything else in the URL stays as written, so an operator can still
tell cameras apart. :func:`restore_secrets` undoes the masking against the stored URL, so a
form or command that sends the masked URL back keeps the stored credentials.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

MASK = "***"
# A query parameter whose name contains one of these holds a secret (``apikey``, ``access_token``,
# ``X-Amz-Signature``, ``passwd`` ...); masking a harmless one by mistake costs nothing.
SECRET_PARAM_WORDS = ("pass", "pwd", "token", "key", "secret", "auth", "sig", "credential", "session")
# A URL inside free text (an exception message, a log line): scheme://, then up to a blank or quote.
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def secret_param(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_PARAM_WORDS)


def _split(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a malformed port, like a bad URL
    except ValueError:
        return None
    return parts


def _mask_query(query: str) -> str:
    out = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        out.append(f"{name}={MASK}" if eq and secret_param(name) else pair)
    return "&".join(out)


def _mask_netloc(parts: SplitResult) -> str:
    if "@" not in parts.netloc:
        return parts.netloc
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    # rtsp://user:pw@host keeps the user; rtsp://token@host (no colon) is a secret on its own
    return f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and secret-looking query values as ``***``."""
    parts = _split(url)
    if parts is None or not parts.scheme or len(parts.scheme) == 1:
        return url  # a file path or a Windows drive: nothing to hide
    netloc = _mask_netloc(parts)
    query = _mask_query(parts.query) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_text(text: str) -> str:
    """Every URL inside ``text`` masked (error strings and log lines that embed a URL)."""
    if "://" not in text:
        return text
    return URL_IN_TEXT.sub(_mask_match, text)


def _mask_match(match: re.Match[str]) -> str:
    # "cannot open rtsp://cam/x: timeout": the colon and such closing marks belong to the sentence
    url = match.group(0)
    core = url.rstrip(".,;:)]")
    return mask_url(core) + url[len(core):]


def restore_secrets(new: str, stored: str) -> str:
    """``new`` with each ``***`` put back from ``stored`` (same user, same query parameter).

    A page or a command only ever shows the masked URL; sending it back, or changing only the
    host, path or a harmless parameter, must not replace the stored password with ``***``.
    """
    if MASK not in new:
        return new
    if new == mask_url(stored):
        return stored
    got, old = _split(new), _split(stored)
    if got is None or old is None:
        return new
    netloc = _restore_userinfo(got.netloc, old.netloc)
    old_params = dict(pair.partition("=")[::2] for pair in old.query.split("&") if "=" in pair)
    restored = []
    for pair in got.query.split("&") if got.query else []:
        name, _, value = pair.partition("=")
        restored.append(f"{name}={old_params[name]}" if value == MASK and name in old_params else pair)
    query = "&".join(restored)
    return urlunsplit((got.scheme, netloc, got.path, query, got.fragment))


def _restore_userinfo(new: str, old: str) -> str:
    if "@" not in new or "@" not in old:
        return new
    new_info, _, hostport = new.rpartition("@")
    old_info = old.rpartition("@")[0]
    user, _, password = new_info.partition(":")
    if new_info == MASK or (password == MASK and old_info.partition(":")[0] == user):
        return f"{old_info}@{hostport}"
    return new


class MaskingFilter(logging.Filter):
    """Masks URLs in every record a handler writes: a log call that forgets ``mask_url`` still hides secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a broken format string: let logging report it as it always does
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            # another handler may have formatted the traceback already: mask that text too
            record.exc_text = mask_text(record.exc_text or logging.Formatter().formatException(record.exc_info))
        return True


def install_log_masking() -> None:
    """Put :class:`MaskingFilter` on every handler of the root logger (call after logging is configured)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
