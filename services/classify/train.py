"""Train (or fine-tune) the emotion classifier and write a model bundle.

    python -m services.classify.train --out runs/fer --epochs 60

Defaults train on ../shared/data/fer2013 (train.npz, model selection on publictest.npz).
``--train`` takes another .npz or a folder per class; ``--init-from BUNDLE`` fine-tunes from
existing weights (a new head is made when the class list differs). Interrupted runs resume
from ``OUT/backup`` when started again with the same arguments; creating the file ``OUT/stop``
ends a run after its current epoch (the bundle is still written from the best epoch).

On a Keras backend other than TensorFlow (``KERAS_BACKEND=jax`` or ``torch``, e.g. on a GPU
machine without TensorFlow) batches come from a NumPy pipeline and the geometric augmentation
runs on the CPU beside it; only ``OUT/best.keras`` is written there, and
``--finish`` on a machine with TensorFlow turns it into the bundle (LiteRT export, calibration).
``--time-budget-s S`` fits the number of epochs to S seconds after timing the second one
(per-epoch warm-up and cosine decay over the epochs that fit).

``--distill W`` trains on soft targets: W times the teacher bundle's served probabilities
(mean over the flip + zoom views, computed once and cached) plus (1 - W) times the label;
``--ferplus W`` mixes in the FER+ crowd votes the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Training this model with oneDNN's fused kernels corrupted the heap on these CPUs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import keras
import numpy as np

from services.classify.datasets import FaceSet, default_fer_dir, default_ferplus_dir, load_any, load_ferplus
from services.classify.model import ArchConfig, build_model, count_macs, recalibrate_batchnorm
from shared.model_bundle import DEFAULT_BUNDLE, KERAS_FILE, read_meta

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    fer = default_fer_dir()
    p = argparse.ArgumentParser(prog="python -m services.classify.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=fer / "train.npz", help=".npz or folder per class")
    p.add_argument("--val", type=Path, default=fer / "publictest.npz", help="selection set (.npz or folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder (bundle + checkpoints)")
    p.add_argument("--epochs", type=non_negative, default=60,
                   help="0: no training, the --init-from model is finished into a bundle as it is")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.0,
                   help="weight EMA momentum (0 = off, the default: Keras averages no BatchNorm statistics)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = published)")
    p.add_argument("--internal-size", type=int, default=48, help="trunk resolution (64 = published)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=0.0, help="L2 on conv kernels (published: 0.01)")
    p.add_argument("--augment", choices=["none", "flip", "light", "strong"], default="strong",
                   help="flip: mirror images only; light: + shifts of 10%%; strong: + rotation and zoom")
    p.add_argument("--trainable", choices=["all", "head"], default="all",
                   help="head: train only the BatchNorm layers and the classifier convolution (a short "
                        "last stage on plain faces, after the augmented schedule)")
    p.add_argument("--erase", action="store_true", help="random erasing on half of the images")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup: Beta(a, a) parameter a for blending pairs of faces and their targets (0 = off)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the teacher's served (flip + zoom) probabilities in each training target; "
                        "the rest is the label (0 = off)")
    p.add_argument("--teacher", type=Path, default=DEFAULT_BUNDLE, help="teacher bundle for --distill")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="where the teacher's probabilities are kept between runs (default OUT/teacher.npz)")
    p.add_argument("--ferplus", type=float, default=0.0,
                   help="weight of the FER+ crowd-vote distribution in each training target (0 = off; "
                        "needs the FER2013 train.npz and the row-aligned FER+ votes)")
    p.add_argument("--ferplus-votes", type=Path, default=default_ferplus_dir() / "train.npz",
                   help="FER+ votes row-aligned with --train")
    p.add_argument("--limit", type=int, default=0, help="use only the first N shuffled training faces")
    p.add_argument("--init-from", type=Path, default=None, help="bundle to fine-tune from")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--version", default=None, help="model version string for the bundle")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="fit the number of epochs (at most --epochs) to this many seconds of training, "
                        "timed on the first epoch; the learning rate then follows per-epoch warm-up and "
                        "cosine decay over the epochs that fit (0 = off)")
    p.add_argument("--pipeline", choices=["auto", "tf", "native"], default="auto",
                   help="input pipeline: tf.data on the TensorFlow backend, NumPy batches augmented with "
                        "OpenCV on any backend (auto: tf when Keras runs on TensorFlow)")
    p.add_argument("--swa-start", type=non_negative, default=0,
                   help="stochastic weight averaging: from this epoch on (1-based) the learning rate stays at "
                        "--swa-lr and the weights at each epoch's end are averaged; the average (its BatchNorm "
                        "statistics re-estimated) replaces the best epoch if the selection set's accuracy is "
                        "higher (0 = off)")
    p.add_argument("--swa-lr", type=float, default=5e-4,
                   help="constant learning rate of the averaged epochs; the cosine decay before them ends there")
    p.add_argument("--bn-faces", type=non_negative, default=8192,
                   help="after training, re-estimate BatchNorm statistics on this many un-augmented training "
                        "faces and keep them if the selection set's accuracy rises (0 = off)")
    p.add_argument("--finish", action="store_true",
                   help="do not train: write the bundle from OUT/best.keras (after a run on a backend "
                        "without TensorFlow)")
    return p.parse_args(argv)


def augmenter(kind: str, seed: int) -> keras.Sequential | None:
    if kind == "none":
        return None
    stack: list[keras.layers.Layer] = [keras.layers.RandomFlip("horizontal", seed=seed)]
    if kind == "flip":
        return keras.Sequential(stack, name="augment")
    stack.append(keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1))
    if kind == "strong":
        stack += [
            keras.layers.RandomRotation(0.04, fill_mode="nearest", seed=seed + 2),
            keras.layers.RandomZoom((-0.15, 0.15), fill_mode="nearest", seed=seed + 3),
        ]
    return keras.Sequential(stack, name="augment")


def random_erase(images: tf.Tensor, seed: int) -> tf.Tensor:
    """Blank one random rectangle (up to a third of each side) in half of the images."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    rng = tf.random.uniform((n, 5), seed=seed)
    eh = tf.cast(rng[:, 0] * tf.cast(h, tf.float32) / 3.0, tf.int32) + 1
    ew = tf.cast(rng[:, 1] * tf.cast(w, tf.float32) / 3.0, tf.int32) + 1
    y0 = tf.cast(rng[:, 2] * tf.cast(h - eh, tf.float32), tf.int32)
    x0 = tf.cast(rng[:, 3] * tf.cast(w - ew, tf.float32), tf.int32)
    active = rng[:, 4] < 0.5
    ys = tf.range(h)[None, :, None]
    xs = tf.range(w)[None, None, :]
    inside = (
        (ys >= y0[:, None, None]) & (ys < (y0 + eh)[:, None, None])
        & (xs >= x0[:, None, None]) & (xs < (x0 + ew)[:, None, None])
        & active[:, None, None]
    )
    return tf.where(inside[..., None], tf.fill(tf.shape(images), 127.5), images)


def mixup(images: tf.Tensor, targets: tf.Tensor, alpha: float, seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Blend each face (and its target) with the face at the mirrored batch position."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    g1 = tf.random.gamma((n,), alpha, seed=seed)
    g2 = tf.random.gamma((n,), alpha, seed=seed + 1)
    lam = g1 / (g1 + g2)
    lam = tf.maximum(lam, 1.0 - lam)  # the first face stays the dominant one
    other = tf.reverse(tf.range(n), axis=[0])
    mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * tf.gather(images, other)
    return mixed, lam[:, None] * targets + (1.0 - lam[:, None]) * tf.gather(targets, other)


def make_dataset(data: FaceSet, batch: int, seed: int, aug: keras.Sequential | None, erase: bool,
                 targets: np.ndarray | None = None, mixup_alpha: float = 0.0) -> tf.data.Dataset:
    """Batches of (faces, targets); ``targets`` (N, C) replaces the one-hot labels when given."""
    import tensorflow as tf

    x = data.images[..., None].astype(np.float32)
    y = targets if targets is not None else keras.utils.to_categorical(data.labels, len(data.classes))
    ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y, dtype=np.float32)))
    if aug is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if aug is not None:
        ds = ds.map(lambda a, b: (aug(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
        if erase:
            ds = ds.map(lambda a, b: (random_erase(a, seed), b), num_parallel_calls=tf.data.AUTOTUNE)
        if mixup_alpha > 0:
            ds = ds.map(lambda a, b: mixup(a, b, mixup_alpha, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def uses_tensorflow() -> bool:
    return bool(keras.backend.backend() == "tensorflow")


def erase_np(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NumPy twin of :func:`random_erase` for the native pipeline."""
    n, h, w = images.shape[:3]
    for i in np.flatnonzero(rng.random(n) < 0.5):
        eh, ew = int(rng.random() * h / 3) + 1, int(rng.random() * w / 3) + 1
        y0, x0 = int(rng.random() * (h - eh)), int(rng.random() * (w - ew))
        images[i, y0:y0 + eh, x0:x0 + ew] = 127.5
    return images


def mixup_np(images: np.ndarray, targets: np.ndarray, alpha: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`mixup` for the native pipeline."""
    lam = rng.beta(alpha, alpha, len(images)).astype(np.float32)
    lam = np.maximum(lam, 1.0 - lam)
    other = np.arange(len(images))[::-1]
    mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * images[other]
    return mixed, lam[:, None] * targets + (1.0 - lam[:, None]) * targets[other]


def affine_np(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """NumPy/OpenCV twin of :func:`augmenter` (same ranges, edges repeated): flips and shifts by up
    to 10%, and for ``strong`` rotations up to 0.04 turn and zooms of +-15%."""
    if kind == "none":
        return images
    if kind == "flip":
        return np.where(rng.random(len(images))[:, None, None, None] < 0.5, images[:, :, ::-1], images)
    n, h, w = images.shape[:3]
    out = np.empty_like(images)
    for i in range(n):
        face = images[i, ..., 0]
        if rng.random() < 0.5:
            face = face[:, ::-1]
        angle = float(rng.uniform(-0.04, 0.04) * 360.0) if kind == "strong" else 0.0
        scale = float(1.0 + rng.uniform(-0.15, 0.15)) if kind == "strong" else 1.0
        matrix = np.asarray(cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale), dtype=np.float64)
        matrix[:, 2] += rng.uniform(-0.1, 0.1, 2) * np.array([w, h], dtype=np.float64)
        out[i, ..., 0] = cv2.warpAffine(np.ascontiguousarray(face), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REPLICATE)
    return out


class FaceBatches(keras.utils.PyDataset):
    """Shuffled (faces, targets) NumPy batches for any Keras backend, augmented on the CPU (on a
    GPU, Keras' augmentation layers inside a JAX graph were slower than the whole model)."""

    def __init__(self, data: FaceSet, targets: np.ndarray, batch: int, seed: int, train: bool,
                 augment: str = "none", erase: bool = False, mixup_alpha: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = data.images
        self.targets = np.asarray(targets, dtype=np.float32)
        self.batch, self.seed, self.train = batch, seed, train
        self.augment, self.erase, self.mixup_alpha = augment, erase, mixup_alpha
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        n = len(self.images)
        return np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.train else np.arange(n)

    def __len__(self) -> int:
        return int(np.ceil(len(self.images) / self.batch))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch:(index + 1) * self.batch]
        x = self.images[rows][..., None].astype(np.float32)
        y = self.targets[rows]
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            x = affine_np(x, self.augment, rng)
            if self.erase:
                x = erase_np(x, rng)
            if self.mixup_alpha > 0:
                x, y = mixup_np(x, y, self.mixup_alpha, rng)
        return x, y

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()


class TimeBudget(keras.callbacks.Callback):
    """Per-epoch warm-up and cosine decay over the epochs that fit ``budget_s``: planned after the
    second epoch of this process (the first also pays for compilation); stops once they are done.
    With ``swa_start`` the decay ends at ``swa_lr`` on the epoch before it, and the rate stays there
    (without a budget, ``epochs`` is the plan)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.peak, self.warmup = args.lr, args.warmup_epochs
        self.budget, self.max_epochs = args.time_budget_s, args.epochs
        self.swa_start, self.swa_lr = args.swa_start, args.swa_lr
        self.planned = args.epochs
        self.started = 0.0
        self.epoch_started = 0.0
        self.first: int | None = None

    def rate(self, epoch: int) -> float:
        if epoch < self.warmup:
            return float(self.peak * (epoch + 1) / (self.warmup + 1))
        if self.swa_start > 0:
            if epoch + 1 >= self.swa_start:
                return float(self.swa_lr)
            span = max(1.0, self.swa_start - 2 - self.warmup)  # the epoch before swa_start lands on swa_lr
            floor = self.swa_lr
        else:
            span, floor = max(1.0, self.planned - self.warmup), 0.0
        progress = min(1.0, (epoch - self.warmup) / span)
        return float(floor + 0.5 * (self.peak - floor) * (1 + np.cos(np.pi * progress)))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_started = time.monotonic()
        if self.first is None:  # the first epoch of this process (a resumed run starts later)
            self.started, self.first = self.epoch_started, epoch
        self.model.optimizer.learning_rate.assign(self.rate(epoch))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == (self.first or 0) + 1 and self.budget > 0:
            now = time.monotonic()
            per_epoch = now - self.epoch_started
            left = self.budget - (now - self.started)
            self.planned = int(min(self.max_epochs, epoch + 1 + max(0.0, left) // per_epoch))
            print(f"time budget {self.budget:.0f}s at {per_epoch:.1f}s/epoch: {self.planned} epochs", flush=True)
        if epoch + 1 >= self.planned:
            self.model.stop_training = True


def teacher_probabilities(teacher: Path, faces: FaceSet, cache: Path) -> np.ndarray:
    """The teacher's served probabilities (mean over flip + zoom views) for every face, cached."""
    version = read_meta(teacher).version
    if cache.exists():
        with np.load(cache) as data:
            if str(data["version"]) == version and np.array_equal(data["labels"], faces.labels):
                print(f"teacher {version}: probabilities read from {cache}", flush=True)
                return np.asarray(data["probs"], dtype=np.float32)
        print(f"teacher cache {cache} is for another teacher or data set: recomputing", flush=True)
    from shared.classifier import DEFAULT_ZOOM_TTA, load_classifier

    started = time.monotonic()
    clf = load_classifier(teacher, "litert", threads=2, flip_tta=True, zoom_tta=DEFAULT_ZOOM_TTA)
    # Raw (uncalibrated) means: a calibration temperature is for serving.
    probs = np.concatenate([clf.predict_raw(faces.images[i:i + 64]) for i in range(0, len(faces.labels), 64)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, probs=probs, labels=faces.labels, version=np.asarray(version))
    agree = float(np.mean(probs.argmax(axis=1) == faces.labels))
    print(f"teacher {version}: {len(probs)} faces in {time.monotonic() - started:.0f}s, "
          f"agrees with the labels on {agree:.4f}; cached in {cache}", flush=True)
    return probs.astype(np.float32)


def mix_targets(labels: np.ndarray, num_classes: int, parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """One-hot labels blended with soft distributions: each (weight, (N, C) rows) takes its weight,
    the label the rest. Rows of a distribution that sum to 0 (no votes) leave the label in their place."""
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    target = onehot.copy()
    for weight, dist in parts:
        dist = np.asarray(dist, dtype=np.float32)
        total = dist.sum(axis=1, keepdims=True)
        rows = np.where(total > 0, dist / np.maximum(total, 1e-12), onehot)
        target += weight * (rows - onehot)
    return target


def training_targets(args: argparse.Namespace, train_set: FaceSet) -> np.ndarray | None:
    """Soft targets for --distill / --ferplus (None: plain one-hot labels)."""
    if args.distill <= 0 and args.ferplus <= 0:
        return None
    if args.distill + args.ferplus >= 1:
        raise SystemExit("--distill + --ferplus must stay below 1: the label keeps the rest")
    parts: list[tuple[float, np.ndarray]] = []
    if args.distill > 0:
        cache = args.teacher_cache or args.out / "teacher.npz"
        parts.append((args.distill, teacher_probabilities(args.teacher, train_set, cache)))
    if args.ferplus > 0:
        votes = load_ferplus(args.ferplus_votes)
        if len(votes) != len(train_set.labels):
            raise SystemExit(f"--ferplus-votes {args.ferplus_votes}: {len(votes)} rows for {len(train_set.labels)} "
                             "training faces (the votes must be row-aligned with --train)")
        parts.append((args.ferplus, votes))
    return mix_targets(train_set.labels, len(train_set.classes), parts)


class Progress(keras.callbacks.Callback):
    """One line per epoch with an ETA for the whole run (keras' bar covers one epoch only)."""

    def __init__(self, epochs: int, log_path: Path, budget: TimeBudget | None = None) -> None:
        super().__init__()
        self._epochs = epochs
        self.budget = budget  # its plan, once made, replaces --epochs
        self.log_path = log_path
        self.started = 0.0
        self.first_epoch = 0

    @property
    def epochs(self) -> int:
        return self.budget.planned if self.budget is not None else self._epochs

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.first_epoch == 0 and epoch > 0 and time.monotonic() - self.started < 1.0:
            self.first_epoch = epoch  # resumed from a backup

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        done = epoch + 1 - self.first_epoch
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(done, 1) * (self.epochs - epoch - 1)
        line = {"epoch": epoch + 1, "epochs": self.epochs, "elapsed_s": round(elapsed, 1),
                "eta_s": round(eta, 1), **{k: round(float(v), 5) for k, v in logs.items()}}
        print(
            f"epoch {epoch + 1}/{self.epochs} loss {logs.get('loss', 0):.4f} acc {logs.get('accuracy', 0):.4f} "
            f"val_loss {logs.get('val_loss', 0):.4f} val_acc {logs.get('val_accuracy', 0):.4f} "
            f"{elapsed / max(done, 1):.0f}s/epoch ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
            flush=True,
        )
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


class StopFile(keras.callbacks.Callback):
    """Ends training after the current epoch once ``path`` exists; the best epoch so far still
    becomes the bundle (for runs that must finish by a deadline)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.path.exists():
            print(f"{self.path} found: stopping after epoch {epoch + 1}", flush=True)
            self.model.stop_training = True


class WeightAverage(keras.callbacks.Callback):
    """Running mean of the weights at the end of every epoch from ``start`` (1-based) on, kept in
    ``path`` after each so that a resumed run goes on averaging where it stopped."""

    def __init__(self, start: int, path: Path) -> None:
        super().__init__()
        self.start, self.path = start, path
        self.count, self.last = 0, 0
        self.mean: list[np.ndarray] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.path.exists():
            self.count, self.last, self.mean = read_average(self.path)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 < self.start or epoch + 1 <= self.last:
            return
        weights = [np.asarray(w, dtype=np.float64) for w in self.model.get_weights()]
        if self.count == 0:
            self.mean = weights
        else:
            self.mean = [m + (w - m) / (self.count + 1) for m, w in zip(self.mean, weights, strict=True)]
        self.count, self.last = self.count + 1, epoch + 1
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, *self.mean, count=self.count, last=self.last)
        tmp.replace(self.path)


def read_average(path: Path) -> tuple[int, int, list[np.ndarray]]:
    """(epochs averaged, last epoch averaged, mean weights) as :class:`WeightAverage` saved them."""
    with np.load(path) as data:
        arrays = [data[f"arr_{i}"] for i in range(len(data.files) - 2)]
        return int(data["count"]), int(data["last"]), arrays


def init_model(args: argparse.Namespace, classes: tuple[str, ...]) -> keras.Model:
    cfg = ArchConfig(num_classes=len(classes), width=args.width, internal_size=args.internal_size,
                     dropout=args.dropout, l2=args.l2)
    model = build_model(cfg)
    if args.init_from is not None:
        copy_weights(model, Path(args.init_from), classes)
    if args.trainable == "head":
        set_head_trainable(model)
    return model


def copy_weights(model: keras.Model, bundle: Path, classes: tuple[str, ...]) -> None:
    source = keras.models.load_model(bundle / KERAS_FILE, compile=False)
    same_head = tuple(read_meta(bundle).classes) == classes
    source_classifier = classifier_layer(source)
    copied = 0
    for src, dst in zip(source.layers, model.layers, strict=False):
        shapes_match = [w.shape for w in src.get_weights()] == [w.shape for w in dst.get_weights()]
        if shapes_match and (same_head or src is not source_classifier):
            dst.set_weights(src.get_weights())
            copied += 1
    log.info("fine-tuning from %s: %d layers copied, head %s", bundle, copied,
             "kept" if same_head else "re-initialised")


def set_head_trainable(model: keras.Model) -> None:
    """Freeze every convolution but the classifier; BatchNorm layers stay trainable (scale, shift
    and, in training mode, their statistics)."""
    classifier = classifier_layer(model)
    for layer in model.layers:
        layer.trainable = layer is classifier or isinstance(layer, keras.layers.BatchNormalization)


def classifier_layer(model: keras.Model) -> keras.layers.Layer:
    """The last convolution: it maps features to one map per class."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]


def compile_model(model: keras.Model, args: argparse.Namespace, steps_per_epoch: int) -> None:
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    schedule: float | keras.optimizers.schedules.LearningRateSchedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / 100, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=args.lr, warmup_steps=warmup,
    )
    if args.time_budget_s > 0 or args.swa_start > 0:
        schedule = args.lr / 100  # a variable that TimeBudget sets each epoch
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=args.weight_decay,
        use_ema=args.ema > 0, ema_momentum=args.ema if args.ema > 0 else 0.99,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
    )


def train_callbacks(args: argparse.Namespace) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.BackupAndRestore(str(args.out / "backup"))]
    if args.ema > 0:
        # Swapped in before the checkpoint so the saved "best" model holds the averaged weights.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks.append(keras.callbacks.ModelCheckpoint(str(args.out / "best.keras"), monitor="val_accuracy",
                                                     mode="max", save_best_only=True))
    budget = TimeBudget(args) if args.time_budget_s > 0 or args.swa_start > 0 else None
    if budget is not None:
        callbacks.append(budget)  # before Progress, which reports its plan
    if args.swa_start > 0:
        callbacks.append(WeightAverage(args.swa_start, args.out / "swa.npz"))
    callbacks += [Progress(args.epochs, args.out / "history.jsonl", budget), StopFile(args.out / "stop")]
    return callbacks


def load_sets(args: argparse.Namespace) -> tuple[FaceSet, FaceSet, np.ndarray | None]:
    """Training faces (shuffled once with the seed, soft targets in the same order) and the
    selection set."""
    train_set = load_any(args.train)
    val_set = load_any(args.val)
    if val_set.classes != train_set.classes:
        raise SystemExit(f"--val classes {val_set.classes} differ from --train classes {train_set.classes}")
    # In file order, like the votes and the teacher cache; not needed to finish a bundle.
    targets = None if args.finish else training_targets(args, train_set)
    order = np.random.default_rng(args.seed).permutation(len(train_set.labels))
    if args.limit:
        order = order[: args.limit]
    train_set = FaceSet(train_set.images[order], train_set.labels[order], train_set.classes)
    return train_set, val_set, None if targets is None else targets[order]


def fit(args: argparse.Namespace, train_set: FaceSet, val_set: FaceSet, targets: np.ndarray | None) -> None:
    model = init_model(args, train_set.classes)
    native = args.pipeline == "native" or (args.pipeline == "auto" and not uses_tensorflow())
    if not native and not uses_tensorflow():
        raise SystemExit(f"--pipeline tf needs the TensorFlow backend; Keras runs on {keras.backend.backend()}")
    steps = int(np.ceil(len(train_set.labels) / args.batch_size))
    compile_model(model, args, steps)
    print(f"params {model.count_params()}, MACs {count_macs(model)}, backend {keras.backend.backend()}", flush=True)
    callbacks = train_callbacks(args)
    if native:
        classes = len(train_set.classes)
        onehot = np.eye(classes, dtype=np.float32)
        model.fit(
            FaceBatches(train_set, targets if targets is not None else onehot[train_set.labels], args.batch_size,
                        args.seed, train=True, augment=args.augment, erase=args.erase, mixup_alpha=args.mixup,
                        workers=4),
            validation_data=FaceBatches(val_set, onehot[val_set.labels], 256, args.seed, train=False),
            epochs=args.epochs, callbacks=callbacks, verbose=0,
        )
        return
    model.fit(
        make_dataset(train_set, args.batch_size, args.seed, augmenter(args.augment, args.seed), erase=args.erase,
                     targets=targets, mixup_alpha=args.mixup),
        validation_data=make_dataset(val_set, 256, args.seed, None, erase=False),
        epochs=args.epochs, callbacks=callbacks, verbose=0,
    )


def read_history(path: Path) -> list[dict[str, Any]]:
    """The per-epoch lines :class:`Progress` wrote (none when the file is missing)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def accuracy(model: keras.Model, faces: FaceSet) -> float:
    probs = model.predict(faces.images.astype(np.float32)[..., None], batch_size=512, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == faces.labels))


def plain_faces(train_set: FaceSet, n: int, seed: int) -> np.ndarray:
    """``n`` un-augmented training faces, the same ones for every use with the same seed."""
    return train_set.images[np.random.default_rng(seed).permutation(len(train_set.labels))[:n]]


def recalibrate_if_better(model: keras.Model, args: argparse.Namespace, train_set: FaceSet,
                          val_set: FaceSet) -> dict[str, Any]:
    """Re-estimate BatchNorm statistics on plain training faces; keep them only where the selection
    set's single-view accuracy rises (the weights themselves are not touched)."""
    faces = plain_faces(train_set, args.bn_faces, args.seed)
    before_weights, before = model.get_weights(), accuracy(model, val_set)
    layers = recalibrate_batchnorm(model, faces[..., None])
    after = accuracy(model, val_set)
    kept = after > before
    if not kept:
        model.set_weights(before_weights)
    print(f"BatchNorm statistics re-estimated on {len(faces)} plain training faces ({layers} layers): "
          f"{Path(args.val).name} {before:.4f} -> {after:.4f}, {'kept' if kept else 'not kept'}", flush=True)
    return {"faces": len(faces), "layers": layers, "val_before": round(before, 5), "val_after": round(after, 5),
            "kept": kept}


def prefer_average(best: keras.Model, args: argparse.Namespace, train_set: FaceSet,
                   val_set: FaceSet) -> tuple[keras.Model, dict[str, Any]]:
    """The weight average (with BatchNorm statistics re-estimated: averaged statistics belong to no
    weights) when it beats the best epoch on the selection set, else the best epoch."""
    count, last, mean = read_average(args.out / "swa.npz")
    averaged = keras.models.clone_model(best)
    averaged.set_weights([m.astype(w.dtype) for m, w in zip(mean, best.get_weights(), strict=True)])
    # Needed even with --bn-faces 0: the averaged statistics are meaningless.
    recalibrate_batchnorm(averaged, plain_faces(train_set, max(args.bn_faces, 2048), args.seed)[..., None])
    best_acc, avg_acc = accuracy(best, val_set), accuracy(averaged, val_set)
    kept = avg_acc > best_acc
    print(f"weight average of epochs {last - count + 1}-{last} ({count} epochs, BatchNorm re-estimated): "
          f"{Path(args.val).name} {avg_acc:.4f} against the best epoch's {best_acc:.4f}, "
          f"{'kept' if kept else 'not kept'}", flush=True)
    record = {"epochs": [last - count + 1, last], "val_average": round(avg_acc, 5), "val_best": round(best_acc, 5),
              "kept": kept}
    return (averaged if kept else best), record


def write_final_bundle(args: argparse.Namespace, train_set: FaceSet, val_set: FaceSet) -> Path:
    from services.classify.export import CALIBRATION_FACES, calibrate_bundle, write_bundle

    best = keras.models.load_model(args.out / "best.keras", compile=False)
    history = read_history(args.out / "history.jsonl")
    recalibration = recalibrate_if_better(best, args, train_set, val_set) if args.bn_faces > 0 else None
    swa = None
    if args.swa_start > 0 and (args.out / "swa.npz").exists():
        best, swa = prefer_average(best, args, train_set, val_set)
    # Paths are recorded by name only: the bundle travels to other machines.
    record = {"train_args": {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items()},
              "train_seconds": float(history[-1]["elapsed_s"]) if history else 0.0, "epochs_run": len(history),
              "arch": asdict(ArchConfig(len(train_set.classes), args.width, args.internal_size, args.dropout, args.l2)),
              "params": int(best.count_params()), "macs": count_macs(best), "bn_recalibration": recalibration,
              "swa": swa}
    bundle = args.out / "bundle"
    version = args.version or f"mini-xception-w{args.width}-{time.strftime('%Y%m%d')}"
    calibration = train_set.images[np.random.default_rng(0).permutation(len(train_set.labels))[:CALIBRATION_FACES]]
    write_bundle(best, bundle, train_set.classes, version, record, calibration=calibration)
    temperatures = calibrate_bundle(bundle, val_set, Path(args.val).name)
    print(f"bundle written to {bundle}; temperatures fitted on {Path(args.val).name}: {temperatures}", flush=True)
    return bundle


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def train(args: argparse.Namespace) -> Path:
    keras.utils.set_random_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, val_set, targets = load_sets(args)
    print(f"train {len(train_set.labels)} faces, val {len(val_set.labels)}, classes {list(train_set.classes)}",
          flush=True)
    if args.epochs == 0 and not args.finish:
        # No training: the starting model itself (e.g. --init-from) becomes the result.
        init_model(args, train_set.classes).save(args.out / "best.keras")
    elif not args.finish:
        fit(args, train_set, val_set, targets)
    if not tensorflow_available():
        print(f"{args.out / 'best.keras'} written; TensorFlow is not installed here, so make the bundle with "
              "the same arguments and --finish where it is", flush=True)
        return args.out / "best.keras"
    return write_final_bundle(args, train_set, val_set)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if uses_tensorflow():
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(2)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
