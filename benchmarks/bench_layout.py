"""The leader's convolutions on a CPU in NCHW and in channels-last layout (issue 9, part 1).

    python benchmarks/bench_layout.py [--variants fuse4seg_tiny fuse4seg_small fuse4seg_paper]
        [--size 64] [--batch 4] [--rounds 3] [--repeats 5] [--threads N]

On a CPU torch runs a convolution through oneDNN, channels-last when its input or its weight
is, else in NCHW. The leader's input has one channel, so unless its weights are channels-last
every convolution in it runs NCHW. Two tables, each timed in turns (``--rounds``, the order
reversed every round), medians of the timed calls, with the ratio NCHW / channels-last:

1. **Each kind of convolution the leader runs**, forward and backward, with the shapes it meets
   in one forward of the first ``--variants`` leader on a ``(--batch, 1, --size, --size)``
   pair (recorded by hooks; one row per distinct input shape, weight shape and groups, with how
   many of the leader's convolutions share it). Input and weight both NCHW, then both
   channels-last.
2. **The whole leader**, forward and backward of ``x_f`` and the four features (the work of a
   leader step without the losses), for each of ``--variants``: built once, then its deep copy
   placed by :func:`fuse4seg.models.place_leader` (channels-last weights), on the same inputs.

A measurement only; :func:`fuse4seg.models.place_leader` is what training uses.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CL = torch.channels_last


def timed_in_turns(calls: dict[str, Callable[[], None]], rounds: int, repeats: int
                   ) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in turns (one untimed call first)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(repeats):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def convolutions(net: nn.Module, *inputs: torch.Tensor) -> list[dict]:
    """The distinct convolutions of one forward ``net(*inputs)``: input shape, weight shape,
    stride, padding, groups, whether the input is channels-last, the output shape, and how many
    modules share them, in the order first met (``probe_follower.py`` uses it too)."""
    seen: dict[tuple, dict] = {}

    def hook(module: nn.Conv2d, args, out):
        x = args[0]
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=CL)
        key = (tuple(x.shape), tuple(module.weight.shape), module.stride, module.padding,
               module.groups, cl)
        if key not in seen:
            seen[key] = {"input": key[0], "weight": key[1], "stride": key[2],
                         "padding": key[3], "groups": key[4], "channels_last": cl,
                         "output": tuple(out.shape), "count": 0}
        seen[key]["count"] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(*inputs)
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def conv_call(conv: dict, layout: torch.memory_format, gen: torch.Generator
              ) -> Callable[[], None]:
    """Forward and backward of one convolution of ``conv``'s shapes, input and weight in
    ``layout``."""
    x = torch.randn(conv["input"], generator=gen).contiguous(memory_format=layout)
    w = torch.randn(conv["weight"], generator=gen).contiguous(memory_format=layout)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def call():
        y = F.conv2d(x, w, stride=conv["stride"], padding=conv["padding"], groups=conv["groups"])
        y.backward(torch.ones_like(y))
        x.grad = w.grad = None

    return call


def leader_call(leader: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> Callable[[], None]:
    def call():
        x_f, feats = leader(x1, x2)
        (x_f.square().sum() + sum(f.square().mean() for f in feats)).backward()
        leader.zero_grad(set_to_none=True)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fuse4seg_tiny"],
                        help="registered leaders (fuse4seg.models.list_fusion_models())")
    parser.add_argument("--size", type=int, default=64, help="slice size")
    parser.add_argument("--batch", type=int, default=4, help="pairs per batch (D_val: B/2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    from fuse4seg.models import create_fusion, list_fusion_models, place_leader

    unknown = sorted(set(args.variants) - set(list_fusion_models()))
    if unknown:
        parser.error(f"--variants: unknown leader(s) {unknown}; known: {list_fusion_models()}")
    if args.size < 4 or args.batch < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--size must be >= 4 and --batch, --rounds, --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(args.batch, 1, args.size, args.size, generator=gen)
    x2 = torch.rand(args.batch, 1, args.size, args.size, generator=gen)
    print(f"# bench_layout: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.size}x{args.size}, batch {args.batch}; {args.rounds} round(s) x "
          f"{args.repeats} calls")

    torch.manual_seed(0)
    first = create_fusion(args.variants[0])
    print(f"\nEach kind of convolution in `{args.variants[0]}`, forward + backward (ms):\n")
    print("| input | weight | groups | in the leader | NCHW | channels-last | NCHW / CL |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for conv in convolutions(first, x1, x2):
        calls = {"nchw": conv_call(conv, torch.contiguous_format, gen),
                 "cl": conv_call(conv, CL, gen)}
        t = timed_in_turns(calls, args.rounds, args.repeats)
        shape = "×".join(map(str, conv["input"]))
        weight = "×".join(map(str, conv["weight"]))
        print(f"| {shape} | {weight} | {conv['groups']} | {conv['count']} | "
              f"{1000 * t['nchw']:.3f} | {1000 * t['cl']:.3f} | {t['nchw'] / t['cl']:.2f} |")

    print("\nThe whole leader, forward + backward of x_f and its features (ms):\n")
    print("| leader | weights | NCHW | channels-last (`place_leader`) | NCHW / CL |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants:
        torch.manual_seed(0)
        nchw = first if name == args.variants[0] else create_fusion(name)
        nchw.train()
        cl = place_leader(copy.deepcopy(nchw), "cpu")
        if not cl.head[0].weight.is_contiguous(memory_format=CL):
            print(f"{name}: place_leader left the weights in NCHW (FUSE4SEG_LEADER_LAYOUT?)",
                  file=sys.stderr)
            return 2
        t = timed_in_turns({"nchw": leader_call(nchw, x1, x2), "cl": leader_call(cl, x1, x2)},
                           args.rounds, args.repeats)
        weights = sum(p.numel() for p in nchw.parameters())
        print(f"| {name} | {weights:,} | {1000 * t['nchw']:.1f} | {1000 * t['cl']:.1f} | "
              f"{t['nchw'] / t['cl']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
