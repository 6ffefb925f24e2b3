"""Seconds per case of `fuse4seg data prepare` (read, check, normalise, slice, write).

    python benchmarks/bench_prepare.py [--data DIR] [--profile paper] [--cases 6]

Without --data it times the built-in phantom (written to a temporary folder first; that time is
reported separately). A second pass over the same inputs measures the no-op re-run (checksums
only). Prints a Markdown table; copy it into RESULTS.md with the machine's name.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from fuse4seg.config import get_config
from fuse4seg.data.layouts import find_cases
from fuse4seg.data.slices import load_manifest, prepare_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="BraTS folder (default: a fresh phantom)")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases to write")
    args = parser.parse_args()
    config = get_config(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        label = str(data)
        if data is None:
            from fuse4seg.data.phantom import write_phantom_dataset

            data = Path(tmp) / "phantom"
            t0 = time.perf_counter()
            write_phantom_dataset(data, cases=args.cases, seed=0, progress=False)
            per = (time.perf_counter() - t0) / args.cases
            label = f"phantom ({args.cases} cases)"
            print(f"phantom generation: {per:.2f} s/case")
        n = len(find_cases(data))
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        prepare_cache(data, cache, config.data, progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_cache(data, cache, config.data, progress=False)
        again = time.perf_counter() - t0
        m = load_manifest(cache)
    print(f"\nmachine: {platform.node()} / {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; data: {label}; profile: {args.profile}\n")
    print("| pass | cases | slices kept | s/case |")
    print("|---|---|---|---|")
    print(f"| first (build) | {n} | {m['num_slices']} | {first / n:.2f} |")
    print(f"| re-run (no-op) | {n} | {m['num_slices']} | {again / n:.3f} |")
    print(f"\nprojected first pass over 1,251 BraTS 2021 cases: {first / n * 1251 / 60:.0f} min")


if __name__ == "__main__":
    main()
