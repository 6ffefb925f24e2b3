"""Seconds per case of `fuse4seg data prepare` and `data check`, against the read floor.

    python benchmarks/bench_prepare.py [--data DIR] [--profile paper] [--cases 6]
        [--workers 1 2] [--before CHECKOUT] [--repeats 3]

The read floor is what nibabel needs just to read the case's three volumes (``nib.load`` +
``np.asanyarray(img.dataobj)`` of T1ce, FLAIR and the segmentation), measured in the same run;
every row gives its ratio to it. Each variant runs in its own fresh Python process (imports
are not timed), and the variants take turns ``--repeats`` times so that they share the
machine's load; the table gives the median. ``--before CHECKOUT`` adds the rows of another
checkout of the project (e.g. ``git worktree add /tmp/before <commit>``), run the same way.

Without --data it times the built-in phantom (written to a temporary folder first; that time is
reported separately). The no-op row is a second pass over the same inputs (checksums only).
Prints a Markdown table; copy it into RESULTS.md with the machine's name and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> None:
    """Time one variant in this process; print ``{"seconds": ..., "cases": ...}``. Imports
    (nibabel's included, which the package imports lazily) are done before the clock starts."""
    import nibabel  # noqa: F401

    from fuse4seg.config import get_config
    from fuse4seg.data.layouts import check_dataset, find_cases
    from fuse4seg.data.slices import prepare_cache

    cases = find_cases(args.data)
    config = get_config(args.profile)
    out: dict = {"cases": len(cases)}
    if args.child == "floor":
        import nibabel as nib
        import numpy as np

        t0 = time.perf_counter()
        for files in cases:
            for key in ("t1ce", "flair", "seg"):
                np.asanyarray(nib.load(str(files.paths[key])).dataobj)
        out["seconds"] = time.perf_counter() - t0
    elif args.child == "check":
        t0 = time.perf_counter()
        summaries = check_dataset(args.data)
        out["seconds"] = time.perf_counter() - t0
        out["bad"] = sum(bool(s["errors"]) for s in summaries)
    else:
        kwargs = {} if args.child_workers == 1 else {"workers": args.child_workers}
        cache = Path(args.cache)
        t0 = time.perf_counter()
        prepare_cache(args.data, cache, config.data, progress=False, **kwargs)
        out["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_cache(args.data, cache, config.data, progress=False, **kwargs)
        out["noop_seconds"] = time.perf_counter() - t0
        out["slices"] = json.loads((cache / "manifest.json").read_text())["num_slices"]
    print(json.dumps(out))


def _run(code: Path, data: Path, profile: str, what: str, workers: int, tmp: Path) -> dict:
    cache = tempfile.mkdtemp(dir=tmp)
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--profile",
           profile, "--child", what, "--child-workers", str(workers), "--cache", cache]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="BraTS folder (default: a fresh phantom)")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases to write")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to time (prepare_cache(workers=N))")
    parser.add_argument("--before", type=Path, help="another checkout to time the same way")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = args.data
        label = str(data)
        if data is None:
            sys.path.insert(0, str(REPO))
            from fuse4seg.data.phantom import write_phantom_dataset

            data = tmp / "phantom"
            t0 = time.perf_counter()
            write_phantom_dataset(data, cases=args.cases, seed=0, progress=False)
            per = (time.perf_counter() - t0) / args.cases
            label = f"phantom ({args.cases} cases)"
            print(f"phantom generation: {per:.2f} s/case")
        variants = [("read floor", REPO, "floor", 1)]
        codes = [("before", args.before)] if args.before else []
        codes.append(("after", REPO))
        for name, code in codes:
            variants.append((f"{name}: data check", code, "check", 1))
            variants += [(f"{name}: prepare, {w} worker{'s' * (w > 1)}", code, "prepare", w)
                         for w in (args.workers if name == "after" else [1])]
        times: dict[str, list[dict]] = {v[0]: [] for v in variants}
        loads = []
        for _ in range(args.repeats):
            for name, code, what, workers in variants:
                times[name].append(_run(code, data, args.profile, what, workers, tmp))
            loads.append(os.getloadavg()[0])

    n = times["read floor"][0]["cases"]
    floor = statistics.median(t["seconds"] for t in times["read floor"]) / n
    print(f"\nmachine: {platform.node()} / {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, 1-min load average during the run "
          f"{min(loads):.1f}-{max(loads):.1f}; data: {label} ({n} cases); "
          f"profile: {args.profile}; median of {args.repeats} turns\n")
    print("| variant | slices kept | s/case | × read floor |")
    print("|---|---:|---:|---:|")
    for name, runs in times.items():
        per = statistics.median(t["seconds"] for t in runs) / n
        slices = runs[0].get("slices", "")
        print(f"| {name} | {slices} | {per:.3f} | {per / floor:.2f} |")
        if "noop_seconds" in runs[0]:
            noop = statistics.median(t["noop_seconds"] for t in runs) / n
            print(f"| {name}, re-run (no-op) | {slices} | {noop:.3f} | {noop / floor:.2f} |")


if __name__ == "__main__":
    main()
