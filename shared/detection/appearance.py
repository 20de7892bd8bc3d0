"""Following a face by its look between detector confirmations.

The Haar cascade fires on a real face only now and then (pose, blur, a hand, lighting): whether
it finds a face on one frame says little about whether the face is still there. The face's own
pixels say more: the patch seen at the last confirmation is looked for around where the face
was (normalised cross-correlation on a small copy, so a face of any size costs the same), as
template trackers do. Matching is cheap (tens of microseconds a face) and never replaces the
detector: it only carries a face from one confirmation to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np

from shared.imaging import UInt8Array
from shared.schema import Box

# The patch is kept this many pixels wide: Haar's own window is 24 px, and a face this small
# still has eyes, nose and mouth apart.
PATCH_SIDE = 24


@dataclass(frozen=True)
class Look:
    """A face's patch at its last confirmation, PATCH_SIDE pixels wide, and the box it came from."""

    patch: UInt8Array
    box: Box


@dataclass(frozen=True)
class Followed:
    box: Box
    score: float  # normalised cross-correlation of the best place, -1..1


def look_of(gray: UInt8Array, box: Box) -> Look | None:
    """The face's patch, or None where the box is not wholly inside the frame."""
    h, w = gray.shape[:2]
    if box.w < 4 or box.h < 4 or box.x < 0 or box.y < 0 or box.x + box.w > w or box.y + box.h > h:
        return None
    scale = PATCH_SIDE / box.w
    size = (PATCH_SIDE, max(4, round(box.h * scale)))
    patch = cv2.resize(gray[box.y:box.y + box.h, box.x:box.x + box.w], size, interpolation=cv2.INTER_AREA)
    if float(patch.std()) < 2.0:  # a flat patch matches anything flat
        return None
    return Look(cast(UInt8Array, patch), box)


def follow(gray: UInt8Array, where: Box, look: Look, reach: float) -> Followed | None:
    """Where the face of ``look`` is now, searched within ``reach`` face sides of ``where``.

    The box keeps the size it had at the confirmation (the detector corrects the size when it
    confirms); None when the search window no longer holds the patch (the face left the frame).
    """
    h, w = gray.shape[:2]
    scale = PATCH_SIDE / look.box.w
    pad = max(2, round(max(look.box.w, look.box.h) * reach))
    x0, y0 = max(0, where.x - pad), max(0, where.y - pad)
    x1, y1 = min(w, where.x + look.box.w + pad), min(h, where.y + look.box.h + pad)
    ph, pw = look.patch.shape[:2]
    sw, sh = round((x1 - x0) * scale), round((y1 - y0) * scale)
    if sw < pw + 1 or sh < ph + 1:
        return None
    window = cv2.resize(gray[y0:y1, x0:x1], (sw, sh), interpolation=cv2.INTER_AREA)
    scores = cv2.matchTemplate(window, look.patch, cv2.TM_CCOEFF_NORMED)
    _, best, _, (bx, by) = cv2.minMaxLoc(scores)
    if not np.isfinite(best):
        return None
    box = Box(x0 + round(bx / scale), y0 + round(by / scale), look.box.w, look.box.h)
    return Followed(box, float(best))
