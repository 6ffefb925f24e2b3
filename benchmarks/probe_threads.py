"""Two Python threads in one process, one OpenMP thread each (issue 9, part 1): a lever bounded.

    python benchmarks/probe_threads.py [--profile default] [--size 80] [--batch 8]
        [--fusion fuse4seg_small] [--segmentation convnext_unet_small] [--rounds 6]
        [--repeats 3] [--threads 2]

The defaults are issue 9's own size and models (80×80, B 8, ``fuse4seg_small``), as in
"Part 1 at the issue's own size and models".

"Threads" in ``RESULTS.md`` shows two one-thread *processes* side by side doing 1.4-1.6× the
steps per second of one process on two threads, and "Data-parallel halves" bounds what one run
could get by splitting each batch between two processes. This probe bounds the other way to use
the two cores one thread each: parts of one outer step that do not depend on each other, run
side by side in two threads of the training process. The pair that fits best is the leader's
two forwards: x_f on D_tr (under ``no_grad``, for the K inner steps) and the leader's forward on
D_val with grad (the first part of the leader step). The leader does not change between them,
and the two take about as long, so side by side they could at best take the time of one.

1. **The two forwards**: one after the other on ``--threads`` threads (as trained), side by
   side in two Python threads of one OpenMP thread each, and one after the other on one
   thread; and the largest difference of x_f between one and two threads.
2. **Single operations**, to see where the overlap is lost: ``n`` calls of one operation on
   one thread, against the same ``n`` calls in each of two threads side by side. A ratio of 1
   is a perfect overlap (two cores, two threads), 2 is no overlap at all (the calls took
   turns), and above 2 the threads slowed each other down.

A measurement only: the thread count is restored when it returns.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layout import timed_in_turns  # noqa: E402
from step_anatomy import random_batch  # noqa: E402

from fuse4seg.config import get_config  # noqa: E402
from fuse4seg.train.bilevel import Engine  # noqa: E402


def side_by_side(*calls: Callable[[], object]) -> None:
    """Run ``calls`` at once, each in its own Python thread on one OpenMP thread."""
    failed: list[BaseException] = []

    def one(fn: Callable[[], object]) -> None:
        torch.set_num_threads(1)
        try:
            fn()
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)

    threads = [threading.Thread(target=one, args=(fn,)) for fn in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]


def on_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` on ``n`` OpenMP threads (returning its value), the caller's count restored
    after."""
    def call() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return call


def op_calls(size: int, batch: int) -> dict[str, Callable[[], object]]:
    """One call of each single operation, on ``(batch/2, 32, size, size)`` maps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(1, batch // 2), 32, size, size, generator=gen)
    w = torch.randn(32, 32, 3, 3, generator=gen)
    wd = torch.randn(32, 1, 3, 3, generator=gen)
    corner = x[:, :2, :8, :8]
    return {
        "3×3 convolution, 32 → 32": lambda: F.conv2d(x, w, padding=1),
        "3×3 depthwise convolution, 32": lambda: F.conv2d(x, wd, padding=1, groups=32),
        "GELU": lambda: F.gelu(x),
        "three small elementwise ops (2×2×8×8)": lambda: (corner * 2 + 1).relu(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--size", type=int, default=80, help="slice size")
    parser.add_argument("--batch", type=int, default=8, help="B (D_tr and D_val: B/2)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    parser.add_argument("--fusion", default="fuse4seg_small", help="the leader variant")
    parser.add_argument("--segmentation", default="convnext_unet_small",
                        help="the follower variant")
    parser.add_argument("--threads", type=int, default=2, help="threads of the trained step")
    parser.add_argument("--op-calls", type=int, default=40,
                        help="calls per timing of a single operation (x50 for the small ops)")
    args = parser.parse_args(argv)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        config = get_config(args.profile, {
            "data.crop_size": args.size, "train.batch_size": args.batch,
            "model.fusion": args.fusion, "model.segmentation": args.segmentation})
        engine = Engine(config, "fuse4seg", torch.device("cpu"), steps_per_epoch=10**6)
        print(f"# probe_threads: {args.profile}, {args.fusion}, {args.segmentation}, "
              f"{args.size}x{args.size}, batch {args.batch}, "
              f"{args.threads} threads as trained, torch {torch.__version__}; {args.rounds} "
              f"rounds x {args.repeats} calls, medians\n")
        half = args.batch // 2
        x1, x2, _ = random_batch(args.batch, args.size, 0)
        leader = engine.leader.net

        def x_f_train():  # the inner loop's x_f on D_tr: eval mode, no grad
            return engine.prior(x1[:half], x2[:half], "rollout", ema=False)

        def forward_val():  # the leader step's forward on D_val, with grad
            leader.train()
            x_fused, _ = leader(x1[half:], x2[half:])
            return x_fused

        def both() -> None:
            x_f_train()
            forward_val()

        t = timed_in_turns({
            "seq": on_threads(args.threads, both),
            "side": lambda: side_by_side(x_f_train, forward_val),
            "one": on_threads(1, both),
        }, args.rounds, args.repeats)
        x_f = {n: on_threads(n, x_f_train)() for n in (1, args.threads)}
        diff = float((x_f[1] - x_f[args.threads]).abs().max())
        print("## 1. The leader's two forwards of an outer step (x_f on D_tr, forward on D_val)"
              "\n")
        print(f"| one after the other, {args.threads} threads (ms) | side by side, 1 thread "
              "each (ms) | one after the other, 1 thread (ms) | side by side / as trained | "
              "largest x_f difference, 1 against "
              f"{args.threads} threads |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {1e3 * t['seq']:.1f} | {1e3 * t['side']:.1f} | {1e3 * t['one']:.1f} | "
              f"{t['side'] / t['seq']:.2f} | {diff:.1e} |\n", flush=True)

        print("## 2. Single operations: n calls alone against n calls in each of two threads"
              "\n")
        print("| operation | n | one thread alone (ms) | two threads side by side (ms) | ratio "
              "(1: overlap, 2: turns) |")
        print("|---|---:|---:|---:|---:|")
        for name, op in op_calls(args.size, args.batch).items():
            n = args.op_calls * (50 if "small" in name else 1)

            def loop(op=op, n=n) -> None:
                for _ in range(n):
                    op()

            times = timed_in_turns({"alone": on_threads(1, loop),
                                    "pair": lambda loop=loop: side_by_side(loop, loop)},
                                   max(1, args.rounds // 2), 1)
            print(f"| {name} | {n} | {1e3 * times['alone']:.1f} | {1e3 * times['pair']:.1f} "
                  f"| {times['pair'] / times['alone']:.2f} |", flush=True)
    finally:
        torch.set_num_threads(before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
