"""Time of one AdamW step on a profile's networks: torch's default loop, ``foreach``, ``fused``.

    python benchmarks/bench_optimizer.py [--profile default] [--steps 60] [--rounds 3]
        [--threads N]

The optimiser step alone (random gradients, no forward or backward), for the profile's
follower and leader, with each of torch's three AdamW implementations, in turns (``--rounds``,
the order reversed every round), so that they share the machine's load; the medians of the
timed steps (the first tenth of each round untimed) are printed with their ratio to the
default loop. On a CPU, torch's default is the per-tensor loop (its ``foreach`` path is the
default on a GPU only); :func:`fuse4seg.train.engine.adamw` uses ``fused`` on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

KINDS = ("loop", "foreach", "fused")


def optimiser(params, kind: str) -> torch.optim.AdamW:
    options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, **options[kind])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=60, help="steps per round and kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be >= 2 and --rounds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from fuse4seg.config import get_config
    from fuse4seg.models import create_fusion, create_segmentation

    cfg = get_config(args.profile)
    nets = {
        "follower": create_segmentation(cfg.model.segmentation, in_channels=1),
        "leader": create_fusion(cfg.model.fusion),
    }
    print(f"# bench_optimizer: profile {args.profile}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} round(s) x {args.steps} steps")
    print("\n| network | tensors | weights | AdamW | step (ms) | × loop |")
    print("|---|---:|---:|---|---:|---:|")
    skip = max(1, args.steps // 10)
    for name, net in nets.items():
        params = list(net.parameters())
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opts = {kind: optimiser(params, kind) for kind in KINDS}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for r in range(args.rounds):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                for i in range(args.steps):
                    start = time.perf_counter()
                    opts[kind].step()
                    if i >= skip:
                        times[kind].append(time.perf_counter() - start)
        base = statistics.median(times["loop"])
        for kind in KINDS:
            t = statistics.median(times[kind])
            print(f"| {name} | {len(params)} | {sum(p.numel() for p in params):,} | {kind} | "
                  f"{1000 * t:.2f} | {base / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
