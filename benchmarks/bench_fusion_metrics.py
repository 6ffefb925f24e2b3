"""Milliseconds per fused image of the fusion metrics (`fuse4seg.metrics.fusion`).

    python benchmarks/bench_fusion_metrics.py [--harvard DIR] [--size 256] [--repeats 30]

Times each of the nine metrics alone and all of them together (``fusion_metrics``) for each
convention, on one 256×256 Harvard MRI-PET test pair when ``--harvard`` is given (F = the
pixel-wise maximum of A and B), else on a synthetic pair of the same size. Single-threaded
NumPy/SciPy work; run it with ``OMP_NUM_THREADS=1`` to time one core. Reports the median over
``--repeats`` runs. ``--device`` is accepted for symmetry with the other benchmarks: the
metrics are NumPy code and always run on the CPU. Prints a Markdown table; copy it into
RESULTS.md with the machine's name.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from fuse4seg.metrics.fusion import CONVENTIONS, METRICS, fusion_metrics


def _synthetic(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    imgs = []
    for sigma in (1.0, 4.0):
        x = gaussian_filter(rng.uniform(0, 255, (size, size)), sigma)
        imgs.append(np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8))
    a, b = imgs
    return np.maximum(a, b), a, b


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, help="Harvard folder (CT-MRI/, PET-MRI/, ...)")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="ignored: the metrics run on the CPU")
    args = parser.parse_args()

    if args.harvard is not None:
        from fuse4seg.data.pairs import find_harvard_pairs, load_pair

        pair = load_pair(find_harvard_pairs(args.harvard, "PET-MRI", "test")[0])
        a, b = pair.a, pair.b
        f = np.maximum(a, b)
        label = f"Harvard PET-MRI test pair {pair.name} (F = max(A, B)), {a.shape[0]}x{a.shape[1]}"
    else:
        f, a, b = _synthetic(args.size)
        label = f"synthetic {args.size}x{args.size} pair"

    rows = {}
    for conv in CONVENTIONS:
        for m in METRICS:
            rows.setdefault(m, {})[conv] = _median_ms(
                lambda m=m, conv=conv: fusion_metrics(f, a, b, conv, [m]), args.repeats
            )
        rows.setdefault("all nine (+ MSE)", {})[conv] = _median_ms(
            lambda conv=conv: fusion_metrics(f, a, b, conv), args.repeats
        )

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"\nmachine: {platform.node()} / {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}; data: {label}; "
        f"median of {args.repeats}\n"
    )
    print("| metric | " + " | ".join(f"{c} (ms)" for c in CONVENTIONS) + " |")
    print("|---|" + "---|" * len(CONVENTIONS))
    for name, per in rows.items():
        print(f"| {name} | " + " | ".join(f"{per[c]:.2f}" for c in CONVENTIONS) + " |")


if __name__ == "__main__":
    main()
