"""Eager vs ``train.compile``: the losses of the same training steps, seed by seed.

For each seed, two :class:`fuse4seg.train.bilevel.Engine` (eager and compiled) start from the
same weights (the seed) and take the same steps on the same random batches: ``--warmup`` warm-up
steps then ``--outer`` outer steps (K follower steps + one leader step). Prints L_lower of every
follower step and L_upper of every leader step for both, and the largest relative difference.
Float noise (a different order of the sums in inductor's kernels) grows over the steps; a bug
(a wrong graph, a lost update) shows as a difference of the size of the losses themselves.

Usage::

    python benchmarks/equiv_compile.py --profile default --size 80 --batch 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from fuse4seg.config import get_config
from fuse4seg.train.bilevel import Engine


def losses(args, seed: int, compiled: bool) -> list[float]:
    config = get_config(
        args.profile,
        {
            "data.crop_size": args.size,
            "train.batch_size": args.batch,
            "train.inner_steps": args.inner_steps,
            "train.compile": compiled,
            "train.seed": seed,
        },
    )
    engine = Engine(config, "fuse4seg", torch.device("cpu"), steps_per_epoch=10**6)
    gen = torch.Generator().manual_seed(1000 + seed)
    phantom = torch.rand(args.batch, 1, args.size, args.size, generator=gen)

    def batch(n: int):
        x1 = (phantom[:n] + 0.1 * torch.rand(n, 1, args.size, args.size, generator=gen)) / 1.1
        x2 = (phantom[:n].flip(-1) + 0.1 * torch.rand(n, 1, args.size, args.size, generator=gen))
        seg = (phantom[:n, 0] * 4).long().clamp(max=3)
        return x1, x2 / 1.1, seg

    out = []
    for _ in range(args.warmup):
        x1, x2, seg = batch(args.batch)
        out.append(engine.follower_step(engine.prior(x1, x2, "warmup", ema=False), seg))
    half = math.ceil(args.batch / 2)
    for _ in range(args.outer):
        x1, x2, seg = batch(half)
        x_tr = engine.prior(x1, x2, "rollout", ema=False)
        out += [engine.follower_step(x_tr, seg) for _ in range(args.inner_steps)]
        out.append(engine.leader_step(*batch(args.batch - half))["L_upper"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    parser.add_argument("--outer", type=int, default=5, help="outer steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    worst = 0.0
    for seed in args.seeds:
        eager, comp = losses(args, seed, False), losses(args, seed, True)
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, comp, strict=True)]
        worst = max(worst, max(rel))
        print(f"seed {seed}: {len(eager)} losses, first {eager[0]:.6f} / {comp[0]:.6f}, "
              f"last {eager[-1]:.6f} / {comp[-1]:.6f} (eager / compiled), "
              f"largest relative difference {max(rel):.2e}", flush=True)
    print(f"largest relative difference over the seeds: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
