"""Faces per second of the emotion classifier, per runtime, at batch 1, 16 and 64, and per set
of test-time views (single view, flip, flip + zoom: 1, 2 and 6 model passes a face); the set the
bundle is served with (its model.json ``zoom_tta``) is named in the report.

    python bench/classifier.py [--model DIR] [--seconds S] [--threads N]

The float runtimes (LiteRT, TensorFlow) read the same bundle; their outputs on the same random
crops are compared first, so a fast runtime that computes something else cannot look good here.
``litert-int8`` (the bundle's model_int8.tflite, when present) computes something slightly
different by design: its accuracy comes from ``python -m services.classify.evaluate --runtime
litert-int8``.
Writes bench/results/classifier.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing

from shared.classifier import DEFAULT_ZOOM_TTA, load_classifier, served_zoom, views_key  # noqa: E402
from shared.model_bundle import DEFAULT_BUNDLE, TFLITE_INT8_FILE, read_meta  # noqa: E402

RUNTIMES = ("litert", "litert-int8", "tensorflow")
BATCHES = (1, 16, 64)
RESULTS = ROOT / "bench" / "results" / "classifier.json"
# name -> (flip_tta, zoom_tta): the settings classify.flip_tta / classify.zoom_tta choose between.
VIEWS = {"single": (False, ()), "flip": (True, ()), "flip+zoom": (True, DEFAULT_ZOOM_TTA)}
SERVED_BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="model bundle folder")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per runtime and batch size")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = runtime default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def random_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def max_abs_diff(models: dict[str, Any], crops: np.ndarray) -> float:
    """Float runtimes must agree; the int8 model is judged by accuracy (services.classify.evaluate)."""
    return float(np.max(np.abs(models["litert"].predict(crops) - models["tensorflow"].predict(crops))))


def faces_per_second(model: Any, crops: np.ndarray, seconds: float) -> dict[str, float]:
    for _ in range(3):
        model.predict(crops)
    calls, started = 0, time.perf_counter()
    latencies = []
    while time.perf_counter() - started < seconds or calls < 3:
        t0 = time.perf_counter()
        model.predict(crops)
        latencies.append(time.perf_counter() - t0)
        calls += 1
    elapsed = time.perf_counter() - started
    return {"faces_per_s": calls * len(crops) / elapsed, "calls": calls,
            "median_ms_per_call": float(np.median(latencies) * 1000)}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'runtime':<13}{'batch':>6}{'faces/s':>12}{'ms/call':>10}{'calls':>8}")
    for r in rows:
        print(f"{r['runtime']:<13}{r['batch']:>6}{r['faces_per_s']:>12.1f}{r['median_ms_per_call']:>10.2f}"
              f"{r['calls']:>8}")


def served_views(args: argparse.Namespace, runtimes: list[str], size: int) -> list[dict[str, Any]]:
    """Faces/s for batches of 64 faces with each set of views, as the classify service runs them."""
    rows = []
    crops = random_crops(SERVED_BATCH, size, seed=2)
    for runtime in runtimes:
        for name, (flip, zoom) in VIEWS.items():
            model = load_classifier(args.model, runtime, args.threads, flip_tta=flip, zoom_tta=zoom)  # type: ignore[arg-type]
            rows.append({"runtime": runtime, "views": name, **faces_per_second(model, crops, args.seconds)})
    print(f"{'runtime':<13}{'views (64 faces a call)':<26}{'faces/s':>10}{'ms/call':>10}")
    for r in rows:
        print(f"{r['runtime']:<13}{r['views']:<26}{r['faces_per_s']:>10.1f}{r['median_ms_per_call']:>10.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = read_meta(args.model)
    runtimes = [r for r in RUNTIMES if r != "litert-int8" or (args.model / TFLITE_INT8_FILE).exists()]
    models = {r: load_classifier(args.model, r, args.threads) for r in runtimes}
    diff = max_abs_diff(models, random_crops(70, meta.input_size, seed=1))
    print(f"model {meta.version} ({args.model}); max |litert - tensorflow| = {diff:.2e}")
    rows = []
    for runtime in runtimes:
        for batch in BATCHES:
            stats = faces_per_second(models[runtime], random_crops(batch, meta.input_size), args.seconds)
            rows.append({"runtime": runtime, "batch": batch, **stats})
    print_table(rows)
    served = served_views(args, [r for r in runtimes if r != "tensorflow"], meta.input_size)
    served_as = views_key(True, served_zoom(meta))
    print(f"served by default (classify.flip_tta on, the bundle's zoom views): {served_as}")
    report = {"model": str(args.model), "model_version": meta.version, "threads": args.threads, "served_as": served_as,
              "seconds": args.seconds, "max_abs_diff": diff, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(), "results": rows,
              "served_views": served}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
