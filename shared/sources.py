"""What kinds of video source a camera URL names."""

from __future__ import annotations

from urllib.parse import urlsplit

SUPPORTED_SCHEMES = ("", "file", "rtsp", "rtsps", "http", "https")


def source_kind(url: str) -> str:
    """'device' (USB index), 'file', 'rtsp' or 'http'; ValueError for anything else."""
    if url.isdigit():
        return "device"
    scheme = urlsplit(url).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported URL scheme {scheme!r}; use a file path, rtsp://, http(s):// or a device index")
    if scheme in ("", "file"):
        return "file"
    return "rtsp" if scheme.startswith("rtsp") else "http"


def file_path(url: str) -> str:
    return url[7:] if url.startswith("file://") else url
