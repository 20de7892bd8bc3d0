"""Video sources through OpenCV/FFmpeg, as a small state machine per camera."""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass
from typing import cast

import cv2

from shared.cameras import CameraSettings
from shared.imaging import UInt8Array
from shared.settings import mask_url
from shared.sources import file_path, source_kind

log = logging.getLogger(__name__)


class SourceState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    ENDED = "ended"
    STOPPED = "stopped"


class SourceError(RuntimeError):
    """The source could not be opened or stopped giving frames."""


class EndOfStream(Exception):  # noqa: N818 (an outcome, not an error)
    """A file source reached its end and does not loop."""


@dataclass
class Frame:
    image: UInt8Array
    capture_ts: float


class VideoSource:
    """Opens, reads and re-opens one camera; blocking calls, used from the camera's thread."""

    def __init__(self, cam: CameraSettings, open_timeout_s: float) -> None:
        self.cam = cam
        self.kind = source_kind(cam.url)
        self.open_timeout_s = open_timeout_s
        self._cap: cv2.VideoCapture | None = None
        self.source_fps = 0.0
        self._grabbed = 0.0

    @property
    def safe_url(self) -> str:
        return mask_url(self.cam.url)

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def open(self) -> None:
        self.close()
        if self.kind == "device":
            cap = cv2.VideoCapture(int(self.cam.url))
        else:
            path = file_path(self.cam.url)
            if self.is_file and not os.path.exists(path):
                raise SourceError(f"file {path} does not exist")
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.open_timeout_s * 1000)]
            cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.safe_url}")
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.source_fps = float(fps) if fps and 0 < fps < 1000 else 0.0

    def read(self) -> Frame:
        self.grab()
        return self.retrieve()

    def grab(self) -> float:
        """Take the next frame from the source without decoding it; returns its capture time.

        A live source thinned to a lower fps grabs every frame (the stream must be drained) but
        decodes only those it publishes: :meth:`retrieve` after a grab.
        """
        if self._cap is None:
            raise SourceError("source is not open")
        if self._cap.grab():
            self._grabbed = time.time()
            return self._grabbed
        if self.is_file:
            if self.cam.loop:
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                if self._cap.grab():
                    self._grabbed = time.time()
                    return self._grabbed
            raise EndOfStream(self.cam.id)
        raise SourceError(f"{self.safe_url} stopped giving frames")

    def retrieve(self) -> Frame:
        """Decode the frame taken by the last :meth:`grab`."""
        if self._cap is None:
            raise SourceError("source is not open")
        ok, image = self._cap.retrieve()
        if ok and image is not None and image.size:
            return Frame(image=cast(UInt8Array, image), capture_ts=self._grabbed)
        raise SourceError(f"{self.safe_url}: grabbed frame could not be decoded")

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
