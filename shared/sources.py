"""What kinds of video source a camera URL names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


# ----------------------------------------------------------------------------- what may be added as a camera

NETWORK_KINDS = frozenset({"rtsp", "http"})
LOCAL_KINDS = frozenset({"file", "device"})


class SourceRefusedError(ValueError):
    """A camera URL the source policy does not allow; the message names the rule and the setting."""


@dataclass(frozen=True)
class SourcePolicy:
    """What a camera added at run time (web admin, ``emotion-stream cameras``, the registry) may open.

    Network sources (rtsp, rtsps, http, https) by default, on ``allowed_hosts`` when that is not
    empty. Local files and devices only with ``allow_local`` and, for files, under ``media_root``:
    otherwise whoever can add a camera can make ingest read any file on the server and the web
    view show it.
    """

    allow_local: bool = False
    media_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()

    def check(self, url: str) -> None:
        kind = source_kind(url)
        if kind in LOCAL_KINDS:
            self._check_local(url, kind)
        elif self.allowed_hosts:
            host = (urlsplit(url).hostname or "").lower()
            if host not in self.allowed_hosts:
                raise SourceRefusedError(f"host {host!r} is not in ingest.allowed_source_hosts "
                                    f"({', '.join(self.allowed_hosts)})")

    def _check_local(self, url: str, kind: str) -> None:
        if not self.allow_local:
            raise SourceRefusedError(f"{'local files' if kind == 'file' else 'local devices'} are refused as cameras: "
                                "only rtsp, rtsps, http and https sources, unless ingest.allow_local_sources is "
                                "set (files then under ingest.media_root)")
        if kind == "device":
            return
        if self.media_root is None:
            raise SourceRefusedError("local files need ingest.media_root: only files under it may be opened")
        path = Path(file_path(url))
        if not path.is_absolute():
            raise SourceRefusedError(f"give the file's absolute path, under ingest.media_root ({self.media_root})")
        root = self.media_root.resolve()
        if not path.resolve().is_relative_to(root):  # resolved: a symlink or '..' cannot lead outside
            raise SourceRefusedError(f"{path} is not under ingest.media_root ({root})")
