"""Face datasets for training and evaluation: FER2013-style .npz files or a folder per class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from shared.imaging import resize_face, resize_faces
from shared.model_bundle import FER2013_CLASSES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp"}
# FER+ vote columns (neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown,
# not a face) -> FER2013 class index; the last three have no FER2013 class.
FERPLUS_TO_FER2013 = (6, 3, 5, 4, 0, 1, 2, None, None, None)


class DatasetError(ValueError):
    """The dataset cannot be read or has the wrong shape."""


@dataclass(frozen=True)
class FaceSet:
    images: npt.NDArray[np.uint8]  # (N, S, S) grey, S = the model's input size
    labels: npt.NDArray[np.int64]  # (N,) indices into classes
    classes: tuple[str, ...]


def default_fer_dir() -> Path:
    """../shared/data/fer2013 beside the repository."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "fer2013"


def default_ferplus_dir() -> Path:
    """../shared/data/ferplus beside the repository (FER+ votes row-aligned with the FER2013 files)."""
    return default_fer_dir().parent / "ferplus"


def load_ferplus(path: Path) -> npt.NDArray[np.float32]:
    """FER+ vote counts folded onto the 7 FER2013 classes, (N, 7); rows of unmatched images are 0."""
    try:
        with np.load(path) as data:
            votes = np.asarray(data["votes"], dtype=np.float32)
            matched = np.asarray(data["matched"], dtype=bool)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file") from exc
    except KeyError as exc:
        raise DatasetError(f"{path}: needs arrays 'votes' and 'matched' ({exc} missing)") from exc
    if votes.ndim != 2 or votes.shape[1] != len(FERPLUS_TO_FER2013) or matched.shape != (len(votes),):
        raise DatasetError(f"{path}: 'votes' must be (N, {len(FERPLUS_TO_FER2013)}), got {votes.shape}")
    folded = np.zeros((len(votes), len(FER2013_CLASSES)), dtype=np.float32)
    for column, cls in enumerate(FERPLUS_TO_FER2013):
        if cls is not None:
            folded[:, cls] += votes[:, column]
    folded[~matched] = 0.0
    return folded


def load_npz(path: Path, classes: tuple[str, ...] = FER2013_CLASSES, size: int = 64) -> FaceSet:
    try:
        with np.load(path) as data:
            images = np.asarray(data["images"])
            labels = np.asarray(data["labels"]).astype(np.int64)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file") from exc
    except KeyError as exc:
        raise DatasetError(f"{path}: needs arrays 'images' and 'labels' ({exc} missing)") from exc
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise DatasetError(f"{path}: 'images' must be uint8 (N, S, S), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: 'labels' must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(f"{path}: labels must lie in 0..{len(classes) - 1}")
    return FaceSet(resize_faces(images, size), labels, classes)


def _class_order(names: list[str]) -> tuple[str, ...]:
    # Folders named like the FER2013 classes keep FER2013 order, so the shipped head fits them.
    by_lower = {n.lower(): n for n in names}
    if set(by_lower) <= {c.lower() for c in FER2013_CLASSES}:
        return tuple(c for c in FER2013_CLASSES if c.lower() in by_lower)
    return tuple(sorted(names))


def load_folder(root: Path, size: int = 64) -> FaceSet:
    """A folder per class of face images (any size; converted to grey and resized)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    dirs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir()}
    if not dirs:
        raise DatasetError(f"{root}: no class sub-folders")
    classes = _class_order(list(dirs))
    lookup = {n.lower(): d for n, d in dirs.items()}
    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted(lookup[name.lower()].iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            img = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise DatasetError(f"{file}: cannot be decoded as an image")
            images.append(resize_face(np.asarray(img, dtype=np.uint8), size))
            labels.append(index)
    if not images:
        raise DatasetError(f"{root}: no images found")
    return FaceSet(np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64), classes)


def load_any(path: Path, size: int = 64) -> FaceSet:
    path = Path(path)
    return load_folder(path, size) if path.is_dir() else load_npz(path, size=size)
