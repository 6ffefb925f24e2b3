"""How much of the CPU outer step's convolution time is oneDNN's own work (issue 9, part 1)?

About a third of the outer step does not shrink with the image (``step_anatomy.py``). Much of
that third is convolutions: at 16×16 each oneDNN convolution still takes 100-250 µs of ATen
self time. This probe splits that time in two, per size:

1. **oneDNN's execution**: outer steps run with oneDNN's verbose mode on (its own ``exec``
   lines, which time each primitive's execution), summed per primitive kind (convolution,
   deconvolution, reorder, eltwise, ...), with the calls per step; also its primitive
   creations by how its cache answered (``cache_hit``, ``cache_miss``) and how many of the
   convolution executions have a 1×1 kernel. The verbose
   lines are read from the process's standard output, redirected to a file for the step.
2. **ATen's convolution ops**: the same step under ``torch.profiler``, the self CPU time of
   every ATen op with ``convolution`` in its name (``mkldnn_convolution``,
   ``convolution_backward``, ``_convolution``, ``convolution``, and the transposed ones):
   oneDNN's execution plus what PyTorch and ideep do around each call inside those ops
   (building the primitive's descriptors and finding it in oneDNN's cache, dispatch), plus
   the profiler's own cost per op. Self time leaves out the ATen ops they call (``empty``,
   ``copy_``, ...), which the profiler counts as their own.

The difference (ATen's convolution time less all of oneDNN's convolution, deconvolution and
reorder executions; the reorders are taken to come from the convolutions) is the per-call
work outside oneDNN's kernels, as profiled. oneDNN's ``eltwise`` executions
are listed but not subtracted: they are GELU and its backward, which ATen also sends to
oneDNN. The outer step itself (median of ``--repeats`` untraced calls) is printed beside
them.

3. **A 1×1 convolution as a matrix product** (``--pointwise``): on a channels-last map a 1×1
   convolution is ``F.linear`` over the channels of each pixel, the same values with no copy
   (``x.permute(0, 2, 3, 1)`` is a contiguous view). Its forward and backward (input, weight
   and bias gradients) as ``F.conv2d`` and as ``F.linear``, medians of ``--calls`` calls
   each, the two in turns.
4. **The same on the whole step** (``--step-rounds``): the outer step at the last of
   ``--sizes`` with
   every 1×1 convolution whose input is channels-last (stride 1, no padding, one group) run
   as ``F.linear`` when its map has at most ``--pointwise-pixels`` B·H·W pixels (default:
   all), against the step as shipped, in one process, in turns.

A measurement only: nothing here changes training. Uses ``bench_train_step.py``'s engine and
inputs (the issue's models by default).

Usage::

    python benchmarks/probe_onednn_calls.py --sizes 16 80
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402

CONVOLUTION_KINDS = ("convolution", "deconvolution", "reorder")


KERNEL = re.compile(r"kh(\d+)s.*kw(\d+)s")


@dataclass
class OneDNNCalls:
    """What oneDNN's verbose lines say about one call of a step: executions and their ms by
    primitive kind, primitive creations by how oneDNN's cache answered, and the executions of
    1×1 convolutions (forward and backward)."""

    kinds: dict[str, tuple[int, float]]
    created: dict[str, int]
    pointwise: int


def onednn_calls(fn, calls: int) -> OneDNNCalls:
    """:class:`OneDNNCalls` per call of ``fn``, from oneDNN's verbose lines (creation and
    ``exec``) over ``calls`` calls, standard output redirected to a file meanwhile."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
                for _ in range(calls):
                    fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().splitlines()
    count: collections.Counter = collections.Counter()
    created: collections.Counter = collections.Counter()
    ms: collections.defaultdict = collections.defaultdict(float)
    pointwise = 0
    for line in lines:
        parts = line.split(",")
        if len(parts) < 7 or parts[0] != "onednn_verbose" or parts[2] != "primitive":
            continue
        if parts[3].startswith("create:"):
            created[parts[3].removeprefix("create:")] += 1
        elif parts[3] == "exec":
            count[parts[5]] += 1
            ms[parts[5]] += float(parts[-1])
            kernel = KERNEL.search(parts[-2])
            pointwise += parts[5] == "convolution" and kernel is not None and \
                kernel.groups() == ("1", "1")
    if not count:
        raise RuntimeError(
            "probe_onednn_calls: oneDNN printed no 'onednn_verbose,...,exec' lines in verbose "
            f"mode ({len(lines)} lines read; first: {lines[:1]}); its verbose format may have "
            "changed, or this torch was built without oneDNN")
    return OneDNNCalls({k: (count[k] // calls, ms[k] / calls) for k in count},
                       {k: n // calls for k, n in created.items()}, pointwise // calls)


def aten_convolution_ms(fn, calls: int) -> tuple[float, int]:
    """Self CPU ms and calls, per call of ``fn``, of the ATen ops with ``convolution`` in their
    name (autograd's wrappers left out), under ``bench_train_step.profiled``."""
    prof, _, _ = bench_train_step.profiled(fn, torch.device("cpu"), calls)
    events = [e for e in prof.key_averages()
              if e.key.startswith("aten::") and "convolution" in e.key]
    return (sum(e.self_cpu_time_total for e in events) / 1000 / calls,
            sum(e.count for e in events if e.key == "aten::convolution") // calls)


def pointwise(shape: tuple[int, int, int, int], calls: int) -> tuple[float, float, float]:
    """µs of one forward and backward of a 1×1 convolution ``(B, C, H, H) -> (B, O, H, H)``
    on channels-last maps (``shape = (B, C, O, H)``) as ``F.conv2d`` and as ``F.linear``
    (medians, the two in turns), and the largest difference of their outputs."""
    import torch.nn.functional as F

    b, c, o, h = shape
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(b, c, h, h, generator=gen).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(o, c, 1, 1, generator=gen).contiguous(memory_format=cl).requires_grad_()
    bias = torch.randn(o, generator=gen, requires_grad=True)
    gy = torch.randn(b, o, h, h, generator=gen).contiguous(memory_format=cl)

    def conv():
        return F.conv2d(x, w, bias)

    def linear():
        return F.linear(x.permute(0, 2, 3, 1), w.view(o, c), bias).permute(0, 3, 1, 2)

    times: dict = {conv: [], linear: []}
    for _ in range(max(2, calls // 10)):  # untimed first calls
        for fn in times:
            torch.autograd.grad(fn(), (x, w, bias), gy)
    for i in range(calls):
        for fn in (conv, linear) if i % 2 == 0 else (linear, conv):
            start = time.perf_counter()
            torch.autograd.grad(fn(), (x, w, bias), gy)
            times[fn].append(1e6 * (time.perf_counter() - start))
    with torch.no_grad():
        diff = (conv() - linear()).abs().max().item()
    return statistics.median(times[conv]), statistics.median(times[linear]), diff


def as_linear(limit: int):
    """A replacement for ``nn.Conv2d._conv_forward`` that runs the 1×1 convolutions of
    channels-last maps of at most ``limit`` B·H·W pixels as ``F.linear``, and counts
    ``{"linear": n, "conv": n}`` calls."""
    import torch.nn.functional as F
    from torch import nn

    shipped = nn.Conv2d._conv_forward
    counts = {"linear": 0, "conv": 0}

    def forward(self, x, weight, bias):
        b, c, h, w = x.shape
        if (weight.shape[-2:] == (1, 1) and self.groups == 1 and self.stride == (1, 1)
                and self.padding in ((0, 0), "valid") and c > 1 and b * h * w <= limit
                and x.is_contiguous(memory_format=torch.channels_last)):
            counts["linear"] += 1
            out = F.linear(x.permute(0, 2, 3, 1), weight.view(weight.shape[:2]), bias)
            return out.permute(0, 3, 1, 2)  # (B, H, W, O) -> (B, O, H, W), channels-last
        counts["conv"] += 1
        return shipped(self, x, weight, bias)

    return shipped, forward, counts


def pointwise_step(case, limit: int, rounds: int, calls: int = 3) -> tuple[float, float, dict]:
    """Median outer step (ms) as shipped and with :func:`as_linear`, in turns (one untimed
    step after each switch), and the calls per step that went each way."""
    from torch import nn

    shipped, forward, counts = as_linear(limit)
    times: dict = {"shipped": [], "linear": []}
    try:
        for r in range(rounds):
            for arm in ("shipped", "linear") if r % 2 == 0 else ("linear", "shipped"):
                nn.Conv2d._conv_forward = forward if arm == "linear" else shipped
                case.outer()
                times[arm] += [1000 * t for t in
                               bench_train_step.timed(case.outer, torch.device("cpu"), calls)]
        nn.Conv2d._conv_forward = forward
        counts.update(linear=0, conv=0)
        case.outer()
    finally:
        nn.Conv2d._conv_forward = shipped
    return statistics.median(times["shipped"]), statistics.median(times["linear"]), dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 80])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--fusion", default="fuse4seg_small")
    parser.add_argument("--segmentation", default="convnext_unet_small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="outer steps traced per part")
    parser.add_argument("--repeats", type=int, default=5, help="untraced outer steps timed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pointwise", nargs="*", default=["4,16,48,20", "4,16,16,80",
                                                            "8,16,48,80", "4,64,64,5"],
                        metavar="B,C,O,H", help="1×1 convolutions to time as F.linear too")
    parser.add_argument("--calls", type=int, default=100, help="calls per --pointwise shape")
    parser.add_argument("--step-rounds", type=int, default=0,
                        help="part 4: rounds of the whole step with 1×1 convolutions as F.linear")
    parser.add_argument("--pointwise-pixels", type=int, default=2**62,
                        help="part 4: only maps of at most this many B·H·W pixels")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in item.split(",")) for item in args.pointwise]
    except ValueError:
        shapes = []
    if len(shapes) != len(args.pointwise) or any(len(t) != 4 or min(t) < 1 for t in shapes):
        parser.error(f"--pointwise: each item is B,C,O,H of positive integers, got "
                     f"{args.pointwise}")
    if min(args.sizes) < 16 or any(s % 16 for s in args.sizes):
        parser.error(f"--sizes: multiples of 16 (the follower's stride), got {args.sizes}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = []
        for size in args.sizes:
            ns = argparse.Namespace(**vars(args), size=size)
            case = bench_train_step.Case(ns, "no_follower_ema", torch.device("cpu"))
            for _ in range(args.warmup):
                case.outer()
            step_ms = 1000 * statistics.median(
                bench_train_step.timed(case.outer, torch.device("cpu"), args.repeats))
            onednn = onednn_calls(case.outer, args.steps)
            aten_ms, convs = aten_convolution_ms(case.outer, args.steps)
            rows.append((size, step_ms, onednn, aten_ms, convs))
        pointwise_rows = [(shape, *pointwise(shape, args.calls)) for shape in shapes]
        step_row = (pointwise_step(case, args.pointwise_pixels, args.step_rounds)
                    if args.step_rounds else None)
    finally:
        torch.set_num_threads(threads)
    half = (args.batch + 1) // 2
    print(f"# probe_onednn_calls: torch {torch.__version__}, {args.threads} threads, batch "
          f"{args.batch} (D_tr {half}, D_val {args.batch - half}), K {args.inner_steps}, "
          f"`{args.fusion}`, `{args.segmentation}`; per outer step: the step's median of "
          f"{args.repeats} untraced calls, the rest means of {args.steps} traced ones\n")
    print("| size | outer step (ms) | ATen convolutions | their self time (ms) | oneDNN "
          "executions: ms | oneDNN's convolutions and reorders (ms) | outside oneDNN's "
          "kernels (ms) | oneDNN's primitive creations | 1×1 convolution executions |")
    print("|---|---:|---:|---:|---|---:|---:|---|---:|")
    for size, step, onednn, aten_ms, convs in rows:
        kinds = onednn.kinds
        each = ", ".join(f"{k} {n}: {ms:.1f}" for k, (n, ms) in
                         sorted(kinds.items(), key=lambda kv: -kv[1][1]))
        total = sum(ms for k, (_, ms) in kinds.items() if k in CONVOLUTION_KINDS)
        created = ", ".join(f"{k} {n}" for k, n in sorted(onednn.created.items())) or "none"
        print(f"| {size}×{size} | {step:.1f} | {convs} | {aten_ms:.1f} | {each} | {total:.1f} "
              f"| {aten_ms - total:.1f} | {created} | {onednn.pointwise} |")
    if pointwise_rows:
        print(f"\n# a 1×1 convolution on channels-last maps, forward and backward, medians of "
              f"{args.calls} calls\n")
        print("| input → output | F.conv2d (µs) | F.linear (µs) | conv / linear | largest "
              "difference |")
        print("|---|---:|---:|---:|---:|")
        for (b, c, o, h), conv_us, linear_us, diff in pointwise_rows:
            print(f"| {b}×{c}×{h}×{h} → {o} | {conv_us:.0f} | {linear_us:.0f} | "
                  f"{conv_us / linear_us:.2f} | {diff:.1e} |")
    if step_row:
        shipped_ms, linear_ms, counts = step_row
        pixels = ("any size" if args.pointwise_pixels >= 2**62
                  else f"at most {args.pointwise_pixels} pixels")
        print(f"\n# the outer step at {args.sizes[-1]}×{args.sizes[-1]} with the 1×1 convolutions "
              f"of channels-last maps of {pixels} as F.linear "
              f"({counts['linear']} calls a step; {counts['conv']} other convolutions), "
              f"{args.step_rounds} rounds in turns\n")
        print("| as shipped (ms) | with F.linear (ms) | shipped / linear |")
        print("|---:|---:|---:|")
        print(f"| {shipped_ms:.1f} | {linear_ms:.1f} | {shipped_ms / linear_ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
