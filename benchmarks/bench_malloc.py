"""What :func:`fuse4seg.train.engine.tune_malloc` changes on a CPU: page faults and step times.

glibc's allocator returns freed activations to the kernel and faults them in again on the next
step unless its thresholds are raised (``tune_malloc``, which every CPU :class:`Engine` calls;
``FUSE4SEG_MALLOC=system`` keeps glibc's defaults). The setting is process-wide and cannot be
undone within a process, so the two settings are measured in **separate processes, in
alternating pairs** (the order swapped every pair, so that a drift in the machine's speed falls
on both): each child builds the engine of ``bench_train_step.py``, runs untimed steps, then
``--rounds`` turns of ``--repeats`` warm-up steps and ``--repeats`` outer steps, and reports
their median times with the minor page faults (mean and median per step) and the kernel
(system) CPU time per step (``getrusage``); the table gives the means. With ``--train DATA``
each pair also times one whole ``fuse4seg train`` run (``--profile``, on DATA) per setting and
checks that both wrote the same losses.

Usage::

    python benchmarks/bench_malloc.py --pairs 6
    python benchmarks/bench_malloc.py --pairs 3 --train _data/phantom
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("system", "tuned")


def child(args) -> dict:
    """One process: the steps of ``bench_train_step.py`` under this process's allocator."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_train_step import Case

    from fuse4seg.train.engine import tune_malloc

    if args.threads:
        torch.set_num_threads(args.threads)
    case = Case(args, "eager", torch.device("cpu"))  # builds the Engine: tune_malloc() ran
    for _ in range(args.warmup):
        case.outer()
        case.warm()
    times: dict[str, list[float]] = {"warm": [], "outer": []}
    faults: dict[str, list[int]] = {"warm": [], "outer": []}
    system = {"warm": 0.0, "outer": 0.0}
    for _ in range(args.rounds):
        for name, fn in (("warm", case.warm), ("outer", case.outer)):
            for _ in range(args.repeats):
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_SELF)
                faults[name].append(after.ru_minflt - before.ru_minflt)
                system[name] += after.ru_stime - before.ru_stime
    n = args.rounds * args.repeats
    return {
        "tuned": tune_malloc(),
        **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()},
        **{f"{k}_faults": sum(v) / n for k, v in faults.items()},  # mean per step
        **{f"{k}_faults_median": statistics.median(v) for k, v in faults.items()},
        **{f"{k}_sys_ms": 1000 * system[k] / n for k in system},
    }


def run_child(args, setting: str) -> dict:
    env = {**os.environ, "FUSE4SEG_MALLOC": "system" if setting == "system" else ""}
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--profile", args.profile, "--size", str(args.size), "--batch", str(args.batch),
        "--inner-steps", str(args.inner_steps), "--repeats", str(args.repeats),
        "--rounds", str(args.rounds), "--warmup", str(args.warmup),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench_malloc: the {setting} child failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["tuned"] != (setting == "tuned"):
        raise SystemExit(f"bench_malloc: the {setting} child reports tuned={result['tuned']}")
    return result


def run_training(args, setting: str, folder: Path) -> tuple[float, list[dict]]:
    """One whole ``fuse4seg train`` run; its wall time and its logged losses (no times)."""
    env = {**os.environ, "FUSE4SEG_MALLOC": "system" if setting == "system" else ""}
    out = folder / setting
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "fuse4seg", "train", "--profile", args.profile,
        "--data", str(args.train), "--cache", str(folder / "cache"), "--out", str(out),
        "--device", "cpu", "--no-progress",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"bench_malloc: `{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    (log,) = out.glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return wall, [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def ratio(system: list[float], tuned: list[float]) -> str:
    return f"{statistics.median(system) / statistics.median(tuned):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="pairs of processes (system, tuned)")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per round and kind")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed outer + warm-up steps")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each child")
    parser.add_argument("--train", type=Path, metavar="DATA",
                        help="also time one whole `fuse4seg train --profile P` run per setting")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # bench_train_step's Case reads these
    args.fusion = args.segmentation = None
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.train is not None and not args.train.exists():
        parser.error(f"--train: {args.train} does not exist")

    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    walls: dict[str, list[float]] = {s: [] for s in SETTINGS}
    losses: dict[str, list[dict]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_malloc_"))
    try:
        if args.train is not None:  # the slice cache first, outside the timed runs
            cmd = [sys.executable, "-m", "fuse4seg", "data", "prepare", str(args.train),
                   "--out", str(tmp / "cache"), "--profile", args.profile]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"bench_malloc: `{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
        for pair in range(args.pairs):
            order = SETTINGS if pair % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                results[setting].append(run_child(args, setting))
                if args.train is not None:
                    wall, rows = run_training(args, setting, tmp)
                    walls[setting].append(wall)
                    if setting in losses and losses[setting] != rows:
                        raise SystemExit(f"bench_malloc: two {setting} runs logged other losses")
                    losses[setting] = rows
                print(f"# pair {pair + 1}/{args.pairs}: {setting} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"# {args.pairs} pairs of processes; profile {args.profile}, {args.size}×{args.size}, "
        f"B {args.batch}, K {args.inner_steps}; torch threads "
        f"{args.threads or 'torch default'}; per child {args.rounds} × {args.repeats} steps "
        f"of each kind after {args.warmup} untimed\n"
    )
    print("| allocator | warm-up step (ms) | outer step (ms) | minor faults per warm-up / "
          "outer step | kernel CPU time per warm-up / outer step (ms) |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        rs = results[setting]
        warm = " · ".join(f"{r['warm_ms']:.1f}" for r in rs)
        outer = " · ".join(f"{r['outer_ms']:.1f}" for r in rs)
        print(
            f"| {setting} | {warm} | {outer} | "
            f"{statistics.median(r['warm_faults'] for r in rs):,.0f} / "
            f"{statistics.median(r['outer_faults'] for r in rs):,.0f} | "
            f"{statistics.median(r['warm_sys_ms'] for r in rs):.1f} / "
            f"{statistics.median(r['outer_sys_ms'] for r in rs):.1f} |"
        )
    sw = [r["warm_ms"] for r in results["system"]]
    tw = [r["warm_ms"] for r in results["tuned"]]
    so = [r["outer_ms"] for r in results["system"]]
    to = [r["outer_ms"] for r in results["tuned"]]
    faster_w = sum(s > t for s, t in zip(sw, tw, strict=True))
    faster_o = sum(s > t for s, t in zip(so, to, strict=True))
    print(
        f"\nsystem / tuned, medians over the children: warm-up step {ratio(sw, tw)}×, outer step "
        f"{ratio(so, to)}×; tuned faster in {faster_w} / {args.pairs} pairs (warm-up) and "
        f"{faster_o} / {args.pairs} (outer)"
    )
    if args.train is not None:
        same = losses["system"] == losses["tuned"]
        print(
            f"whole `fuse4seg train --profile {args.profile}` runs (s): system "
            f"{' · '.join(f'{w:.1f}' for w in walls['system'])}; tuned "
            f"{' · '.join(f'{w:.1f}' for w in walls['tuned'])}; system / tuned "
            f"{ratio(walls['system'], walls['tuned'])}× (medians); "
            f"the same logged losses: {'yes' if same else 'NO'}"
        )
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
