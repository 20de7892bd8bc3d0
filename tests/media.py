"""Media for the integration tests: H.264 files, an RTSP server process, an MJPEG HTTP server."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from support import REPO, free_port

DEBIAN_PYTHON = "/usr/bin/python3"


def write_h264(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    """H.264 mp4 through ffmpeg (OpenCV's wheels have no H.264 encoder)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed (deploy/run.sh test installs it)")
    h, w = frames[0].shape[:2]
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
           "-g", str(fps), "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True, timeout=120)
    return path


class RtspServer:
    def __init__(self, source: str) -> None:
        check = subprocess.run([DEBIAN_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
                               capture_output=True, timeout=30)
        if check.returncode != 0:
            pytest.skip("GStreamer RTSP server not installed (deploy/run.sh test installs it)")
        self.port = free_port()
        self.source = source
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> RtspServer:
        self.proc = subprocess.Popen([DEBIAN_PYTHON, str(REPO / "tests" / "rtsp_server.py"), str(self.port), "/cam",
                                      self.source], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"RTSP server failed: {line}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class MjpegServer:
    """multipart/x-mixed-replace JPEG stream, as IP cameras serve it, looping over frames."""

    def __init__(self, frames: list[np.ndarray], fps: float, port: int | None = None) -> None:
        self.jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        self.fps = fps
        self.port = port or free_port()  # a given port: the same camera coming back
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not outer.stopping.is_set():
                        jpg = outer.jpegs[i % len(outer.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                        i += 1
                        time.sleep(1.0 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        return Handler

    def start(self) -> MjpegServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


class HangingMjpeg(MjpegServer):
    """Sends a few frames, then keeps the connection open and silent."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        super().__init__(frames, fps=10)
        self.hang_after = 10

    def _handler(self) -> Any:
        base = super()._handler()
        outer = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for jpg in outer.jpegs[: outer.hang_after]:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                    self.wfile.write(f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.1)
                outer.stopping.wait(60)

        return Handler
