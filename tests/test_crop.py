"""Crop geometry: square, centred, margin, padded at the frame edges."""

from __future__ import annotations

import numpy as np
import pytest

from shared.detection import DetectorSettings, HaarDetector, crop_face, crop_region, detect_and_crop
from shared.schema import Box


def test_region_is_square_centred_with_margin() -> None:
    region = crop_region(Box(100, 50, 40, 60), margin=0.25)
    assert region.side == 90  # max(40, 60) * 1.5
    assert region.x0 + region.side / 2 == pytest.approx(120, abs=0.5)
    assert region.y0 + region.side / 2 == pytest.approx(80, abs=0.5)


def test_crop_is_64x64_grey_and_samples_the_box() -> None:
    frame = np.zeros((200, 300), dtype=np.uint8)
    frame[50:150, 100:200] = 255
    crop = crop_face(frame, Box(100, 50, 100, 100), margin=0.0)
    assert crop.shape == (64, 64) and crop.dtype == np.uint8
    assert crop.min() == 255


def test_margin_brings_in_the_surroundings() -> None:
    frame = np.zeros((200, 300), dtype=np.uint8)
    frame[50:150, 100:200] = 255
    crop = crop_face(frame, Box(100, 50, 100, 100), margin=0.25)
    assert crop[32, 32] == 255
    assert crop[0, 0] == 0 and crop[63, 63] == 0


def test_crop_at_the_corner_is_padded_by_replicating_the_edge() -> None:
    frame = np.full((100, 100), 7, dtype=np.uint8)
    frame[:10, :10] = 200
    crop = crop_face(frame, Box(0, 0, 20, 20), margin=0.5)
    assert crop.shape == (64, 64)
    assert crop[0, 0] == 200  # replicated from the corner, not black


def test_haar_finds_the_astronaut_and_downscaled_detection_maps_back() -> None:
    from shared.sample import render_frames

    frame = render_frames(1)[0]
    full = detect_and_crop(HaarDetector(DetectorSettings()), frame, margin=0.1)
    small = detect_and_crop(HaarDetector(DetectorSettings(downscale_width=320)), frame, margin=0.1)
    assert len(full) == 1 and len(small) == 1
    a, b = full[0].box, small[0].box
    assert abs(a.x - b.x) < 0.15 * a.w and abs(a.w - b.w) < 0.2 * a.w
    assert full[0].crop.shape == (64, 64)


def test_no_face_in_a_flat_image() -> None:
    assert detect_and_crop(HaarDetector(DetectorSettings()), np.full((240, 320), 128, np.uint8), 0.1) == []


def test_following_detector_searches_around_known_faces_between_keyframes() -> None:
    from shared.detection import FollowingDetector
    from shared.imaging import to_gray
    from shared.sample import render_frames

    cfg = DetectorSettings(keyframe_interval=5)
    follower = FollowingDetector(HaarDetector(cfg), cfg)
    full = HaarDetector(DetectorSettings())
    frames = [to_gray(f) for f in render_frames(20)]
    for frame in frames:
        got = follower.detect(frame, "cam")
        want = full.detect(frame)
        face = [b for b in want if abs(b.y - 106) < 15]  # the astronaut; Haar adds a stray box now and then
        assert len(face) == 1
        assert any(abs(b.x - face[0].x) <= 0.2 * face[0].w and abs(b.y - face[0].y) < 15 for b in got), (got, face)
    assert follower.keyframes <= 8 and follower.followed >= 12
    before = follower.keyframes
    assert follower.detect(np.full_like(frames[0], 90), "cam") == []  # face gone: a keyframe finds nothing
    assert follower.keyframes == before + 1


def test_haar_detect_near_searches_only_around_the_known_face_size() -> None:
    from shared.imaging import to_gray
    from shared.sample import render_frames

    frame = to_gray(render_frames(1)[0])
    haar = HaarDetector(DetectorSettings())
    face = next(b for b in haar.detect(frame) if abs(b.y - 106) < 15)
    pad = face.w // 2
    roi = np.ascontiguousarray(frame[face.y - pad:face.y + face.h + pad, face.x - pad:face.x + face.w + pad])
    near = haar.detect_near(roi, face.w)
    assert len(near) == 1
    assert abs(near[0].x - pad) <= 0.15 * face.w and abs(near[0].w - face.w) <= 0.25 * face.w, (near, face)
    assert haar.detect_near(roi, face.w * 3) == []  # faces of another size are not looked for
