"""Inference throughput by batch size: the slices of a volume through leader and follower.

    python benchmarks/bench_inference.py [--profile default] [--method fuse4seg] \\
        [--slices 64] [--batches 1 2 4 8 16] [--rounds 3] [--threads N] [--device cpu]

Builds the profile's networks for ``--method`` (random weights: the cost does not depend on
them) and times :func:`fuse4seg.inference.segment_slices` on ``--slices`` random slices of the
profile's size at each batch size, the batch sizes taken in turns (``--rounds``, the order
reversed every round) so that they share the machine's load. Prints the median seconds per
100 slices and the ratio to the batch size 16 (the old default). Scoring a run on the default
phantom's 6 test patients pushes 930 slices through both networks, so this sets how long
``evaluate_run`` takes; the chosen default is :func:`fuse4seg.inference.default_batch_size`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--method", default="fuse4seg")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fuse4seg.config import get_config
    from fuse4seg.inference import Bundle, segment_slices
    from fuse4seg.models.registry import build_leader
    from fuse4seg.train.methods import build_follower, get_method

    config = get_config(args.profile)
    dev = torch.device(args.device)
    spec = get_method(args.method)
    leader = build_leader(config).to(dev).eval() if spec.leader else None
    follower = build_follower(config, args.method).to(dev).eval()
    bundle = Bundle(args.method, config, leader, follower, "brats2021", 0, None, dev)
    size = config.data.crop_size
    rng = np.random.default_rng(0)
    x1 = rng.random((args.slices, size, size), dtype=np.float32)
    x2 = rng.random((args.slices, size, size), dtype=np.float32)
    for b in args.batches:  # first calls: allocator, oneDNN primitives
        segment_slices(bundle, x1[: 2 * b], x2[: 2 * b], b)
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    order = list(args.batches)
    for _ in range(args.rounds):
        for b in order:
            t0 = time.perf_counter()
            segment_slices(bundle, x1, x2, b)
            times[b].append((time.perf_counter() - t0) * 100 / args.slices)
        order.reverse()
    base = statistics.median(times[16]) if 16 in times else None
    print(f"{args.method}, profile {args.profile} ({size}x{size}), {args.slices} slices, "
          f"{torch.get_num_threads()} torch threads, {args.device}, load "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| batch | s per 100 slices (median) | all rounds | × batch 16 |")
    print("|---:|---:|---|---:|")
    for b in args.batches:
        med = statistics.median(times[b])
        ratio = f"{base / med:.2f}" if base else "–"
        print(f"| {b} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times[b])} | {ratio} |")


if __name__ == "__main__":
    main()
