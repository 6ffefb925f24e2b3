"""Milliseconds per fused image of the fusion metrics (`fuse4seg.metrics.fusion`).

    python benchmarks/bench_fusion_metrics.py [--harvard DIR] [--size 256] [--repeats 30]
        [--before CHECKOUT] [--clock wall|cpu]

Times each of the nine metrics alone and all of them together (``fusion_metrics``) for each
convention, on one 256×256 Harvard MRI-PET test pair when ``--harvard`` is given (F = the
pixel-wise maximum of A and B), else on a synthetic pair of the same size. Single-threaded
NumPy/SciPy work; run it with ``OMP_NUM_THREADS=1`` to time one core. Reports the median over
``--repeats`` runs.

``--before CHECKOUT`` also loads ``fuse4seg.metrics.fusion`` (and the modules it imports) of
another checkout (e.g. ``git worktree add /tmp/before <commit>``, or ``git archive <commit>
fuse4seg | tar -x -C /tmp/before``) and times both versions in alternation, call by
call, so that they share the machine's load; each cell is then ``before → after``, and the
largest relative difference between the two versions' values is printed. ``--clock cpu``
times the thread's CPU time instead of the elapsed time, for a machine whose cores other
processes share (it leaves out the time they hold the core, not what they do to the caches and
memory bandwidth). ``--device`` is
accepted for symmetry with the other benchmarks: the metrics always run on the CPU. Prints a
Markdown table; copy it into RESULTS.md with the machine's name and load.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from fuse4seg.metrics import fusion  # noqa: E402
from fuse4seg.metrics.fusion import CONVENTIONS, METRICS  # noqa: E402


def _synthetic(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    imgs = []
    for sigma in (1.0, 4.0):
        x = gaussian_filter(rng.uniform(0, 255, (size, size)), sigma)
        imgs.append(np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8))
    a, b = imgs
    return np.maximum(a, b), a, b


def _median_ms(fns, repeats: int, clock=time.perf_counter) -> list[float]:
    """Median milliseconds of each function, timed in alternation (one call of each per
    round) after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return [1000 * float(np.median(t)) for t in times]


def _load_module(checkout: Path):
    """``fuse4seg.metrics.fusion`` of another checkout, with the modules it imports
    (``kernels``, ``ssim``, ``vif``) taken from that checkout too, not from this one."""
    ours = {k: v for k, v in sys.modules.items() if k == "fuse4seg" or k.startswith("fuse4seg.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(checkout))
    try:
        module = importlib.import_module("fuse4seg.metrics.fusion")
    finally:
        sys.path.remove(str(checkout))
        for k in [k for k in sys.modules if k == "fuse4seg" or k.startswith("fuse4seg.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    path = Path(module.__file__).resolve()
    if not path.is_relative_to(checkout.resolve()):
        raise SystemExit(f"--before {checkout}: loaded {path} instead")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, help="Harvard folder (CT-MRI/, PET-MRI/, ...)")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--before", type=Path, help="another checkout to time alongside")
    parser.add_argument("--device", default="cpu", help="ignored: the metrics run on the CPU")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time (time.thread_time), which leaves "
        "out the time other processes hold the core on a shared, overloaded machine",
    )
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

    modules = [fusion] if args.before is None else [_load_module(args.before), fusion]
    worst = 0.0
    if len(modules) == 2:
        for conv in CONVENTIONS:
            old, new = (m.fusion_metrics(f, a, b, conv) for m in modules)
            for k, v in old.items():
                if not (math.isnan(v) and math.isnan(new[k])):
                    worst = max(worst, abs(new[k] - v) / max(abs(v), 1e-300))

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows: dict[str, dict[str, list[float]]] = {}
    load = [os.getloadavg()[0]]
    for conv in CONVENTIONS:
        for m in METRICS:
            rows.setdefault(m, {})[conv] = _median_ms(
                [
                    lambda mod=mod, m=m, conv=conv: mod.fusion_metrics(f, a, b, conv, [m])
                    for mod in modules
                ],
                args.repeats,
                clock,
            )
        rows.setdefault("all nine (+ MSE)", {})[conv] = _median_ms(
            [lambda mod=mod, conv=conv: mod.fusion_metrics(f, a, b, conv) for mod in modules],
            args.repeats,
            clock,
        )
        load.append(os.getloadavg()[0])

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"\nmachine: {platform.node()} / {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, 1-min load average during the run "
        f"{min(load):.1f}-{max(load):.1f}; data: {label}; median of {args.repeats} "
        f"({args.clock} clock)"
    )
    print(f"after: {fusion.__file__}")
    if len(modules) == 2:
        print(
            f"before: {modules[0].__file__}; largest relative difference of the values: {worst:.1e}"
        )
    print()
    print("| metric | " + " | ".join(f"{c} (ms)" for c in CONVENTIONS) + " |")
    print("|---|" + "---|" * len(CONVENTIONS))
    for name, per in rows.items():
        cells = [" → ".join(f"{t:.2f}" for t in per[c]) for c in CONVENTIONS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
