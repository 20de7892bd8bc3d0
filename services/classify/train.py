"""Train (or fine-tune) the emotion classifier and write a model bundle.

    python -m services.classify.train --out runs/fer --epochs 60

Defaults train on ../shared/data/fer2013 (train.npz, model selection on publictest.npz).
``--train`` takes another .npz or a folder per class; ``--init-from BUNDLE`` fine-tunes from
existing weights (a new head is made when the class list differs). Interrupted runs resume
from ``OUT/backup`` when started again with the same arguments.
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
from typing import Any

# Training this model with oneDNN's fused kernels corrupted the heap on these CPUs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from services.classify.datasets import FaceSet, default_fer_dir, load_any
from services.classify.export import CALIBRATION_FACES, write_bundle
from services.classify.model import ArchConfig, build_model, count_macs
from shared.model_bundle import KERAS_FILE, read_meta

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    fer = default_fer_dir()
    p = argparse.ArgumentParser(prog="python -m services.classify.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=fer / "train.npz", help=".npz or folder per class")
    p.add_argument("--val", type=Path, default=fer / "publictest.npz", help="selection set (.npz or folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder (bundle + checkpoints)")
    p.add_argument("--epochs", type=int, default=60)
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
    p.add_argument("--augment", choices=["none", "light", "strong"], default="strong")
    p.add_argument("--erase", action="store_true", help="random erasing on half of the images")
    p.add_argument("--limit", type=int, default=0, help="use only the first N shuffled training faces")
    p.add_argument("--init-from", type=Path, default=None, help="bundle to fine-tune from")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--version", default=None, help="model version string for the bundle")
    return p.parse_args(argv)


def augmenter(kind: str, seed: int) -> keras.Sequential | None:
    if kind == "none":
        return None
    stack: list[keras.layers.Layer] = [
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1),
    ]
    if kind == "strong":
        stack += [
            keras.layers.RandomRotation(0.04, fill_mode="nearest", seed=seed + 2),
            keras.layers.RandomZoom((-0.15, 0.15), fill_mode="nearest", seed=seed + 3),
        ]
    return keras.Sequential(stack, name="augment")


def random_erase(images: tf.Tensor, seed: int) -> tf.Tensor:
    """Blank one random rectangle (up to a third of each side) in half of the images."""
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


def make_dataset(data: FaceSet, batch: int, seed: int, aug: keras.Sequential | None, erase: bool) -> tf.data.Dataset:
    x = data.images[..., None].astype(np.float32)
    y = keras.utils.to_categorical(data.labels, len(data.classes)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if aug is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if aug is not None:
        ds = ds.map(lambda a, b: (aug(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
        if erase:
            ds = ds.map(lambda a, b: (random_erase(a, seed), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class Progress(keras.callbacks.Callback):
    """One line per epoch with an ETA for the whole run (keras' bar covers one epoch only)."""

    def __init__(self, epochs: int, log_path: Path) -> None:
        super().__init__()
        self.epochs = epochs
        self.log_path = log_path
        self.started = 0.0
        self.first_epoch = 0

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


def init_model(args: argparse.Namespace, classes: tuple[str, ...]) -> keras.Model:
    cfg = ArchConfig(num_classes=len(classes), width=args.width, internal_size=args.internal_size,
                     dropout=args.dropout, l2=args.l2)
    model = build_model(cfg)
    if args.init_from is None:
        return model
    source = keras.models.load_model(Path(args.init_from) / KERAS_FILE, compile=False)
    same_head = tuple(read_meta(args.init_from).classes) == classes
    copied = 0
    for src, dst in zip(source.layers, model.layers, strict=False):
        shapes_match = [w.shape for w in src.get_weights()] == [w.shape for w in dst.get_weights()]
        if shapes_match and (same_head or src is not source.layers[-3]):
            dst.set_weights(src.get_weights())
            copied += 1
    log.info("fine-tuning from %s: %d layers copied, head %s", args.init_from, copied,
             "kept" if same_head else "re-initialised")
    return model


def compile_model(model: keras.Model, args: argparse.Namespace, steps_per_epoch: int) -> None:
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / 100, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=args.lr, warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=args.weight_decay,
        use_ema=args.ema > 0, ema_momentum=args.ema if args.ema > 0 else 0.99,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
    )


def train(args: argparse.Namespace) -> Path:
    keras.utils.set_random_seed(args.seed)
    train_set = load_any(args.train)
    val_set = load_any(args.val)
    if val_set.classes != train_set.classes:
        raise SystemExit(f"--val classes {val_set.classes} differ from --train classes {train_set.classes}")
    order = np.random.default_rng(args.seed).permutation(len(train_set.labels))
    if args.limit:
        order = order[: args.limit]
    train_set = FaceSet(train_set.images[order], train_set.labels[order], train_set.classes)
    print(f"train {len(train_set.labels)} faces, val {len(val_set.labels)}, classes {list(train_set.classes)}",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = init_model(args, train_set.classes)
    steps = int(np.ceil(len(train_set.labels) / args.batch_size))
    compile_model(model, args, steps)
    print(f"params {model.count_params()}, MACs {count_macs(model)}", flush=True)
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.BackupAndRestore(str(args.out / "backup"))]
    if args.ema > 0:
        # Swapped in before the checkpoint so the saved "best" model holds the averaged weights.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [
        keras.callbacks.ModelCheckpoint(str(args.out / "best.keras"), monitor="val_accuracy",
                                        mode="max", save_best_only=True),
        Progress(args.epochs, args.out / "history.jsonl"),
    ]
    aug = augmenter(args.augment, args.seed)
    started = time.monotonic()
    model.fit(
        make_dataset(train_set, args.batch_size, args.seed, aug, erase=args.erase),
        validation_data=make_dataset(val_set, 256, args.seed, None, erase=False),
        epochs=args.epochs, callbacks=callbacks, verbose=0,
    )
    best = keras.models.load_model(args.out / "best.keras", compile=False)
    # Paths are recorded by name only: the bundle travels to other machines.
    record = {"train_args": {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items()},
              "train_seconds": round(time.monotonic() - started, 1),
              "arch": asdict(ArchConfig(len(train_set.classes), args.width, args.internal_size, args.dropout, args.l2)),
              "params": int(best.count_params()), "macs": count_macs(best)}
    bundle = args.out / "bundle"
    version = args.version or f"mini-xception-w{args.width}-{time.strftime('%Y%m%d')}"
    calibration = train_set.images[np.random.default_rng(0).permutation(len(train_set.labels))[:CALIBRATION_FACES]]
    write_bundle(best, bundle, train_set.classes, version, record, calibration=calibration)
    print(f"bundle written to {bundle}", flush=True)
    return bundle


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
