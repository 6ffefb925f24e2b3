"""Where a follower update goes on a CPU, and what the ConvNeXt block's two CPU rewrites buy
(issue 9, part 1).

    python benchmarks/probe_follower.py [--profile default] [--size 64] [--batch 8]
        [--inner-steps 3] [--rounds 6] [--repeats 3] [--threads 2] [--onednn-verbose]

The follower is about 70 % of the ``default`` profile's outer step (its K updates on D_tr and
its forward and backward in the leader step) and all of a warm-up step, and two thirds of an
update is its backward (``step_anatomy.py``). Two tables, each timed in turns (the order
reversed every round), medians:

1. **The follower's convolutions**, one row per distinct shape met in one forward of the
   profile's follower on a ``(--batch, 1, S, S)`` input, in the memory layout training gives
   each its input (recorded by hooks; the transposed up-sampling convolutions are not among
   them): the forward, the backward to the input and the backward to the weight through
   torch's own kernels, timed apart (``aten.convolution_backward`` asked for one of them), and
   the weight gradient's time over the forward's. Then, for each 7×7 depthwise shape, the
   weight gradient three ways: oneDNN's, the package's before 2026-12-04 (chunks of at most
   64 images × channels, padded with ``F.pad``: :func:`chunked_weight_grad`, kept here to
   measure against) and the package's ``depthwise_weight_grad`` (one call). With
   ``--onednn-verbose`` oneDNN then prints the kernel it runs for the forward and for the
   weight gradient of the first depthwise shape.
2. **A follower update, and the outer step, under each variant** of
   :meth:`fuse4seg.models.segmentation.ConvNeXtBlock.forward_parts`:

   - ``autograd``: the block as written, differentiated by autograd (the code before the
     rewrites; ``FUSE4SEG_CONVNEXT=autograd``), the baseline;
   - ``mlp``: ``pw1 → GELU → GRN → pw2`` as one autograd function with GRN folded into pw2's
     weight (``_FoldedMLP``);
   - ``dw``: the 7×7 depthwise convolutions' gradients as forward convolutions
     (``_DepthwiseByForward``);
   - ``shipped``: both, what a CPU runs.

   Rows: the warm-up step (an update on B slices), an update on D_tr (B/2) and the outer step
   (``bench_train_step.outer_step``: x_f on D_tr, K updates, the leader step), each as
   ``autograd``'s time over the variant's. Before the timing, each variant's L_lower and
   gradients are compared with ``autograd``'s on the same weights and batch (largest
   difference relative to the largest gradient).

A measurement only: it patches ``ConvNeXtBlock.forward`` for the duration of a variant and
restores it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layout import convolutions, timed_in_turns  # noqa: E402
from bench_train_step import outer_step  # noqa: E402
from step_anatomy import build_engine, random_batch  # noqa: E402

from fuse4seg.models import segmentation as seg_mod  # noqa: E402
from fuse4seg.train.bilevel import Engine  # noqa: E402

VARIANTS = ("autograd", "mlp", "dw", "shipped")


# ------------------------------------------------------------------------ the variants
FORWARDS = {"autograd": (False, False), "mlp": (True, False), "dw": (False, True),
            "shipped": (True, True)}
"""Per variant: ``ConvNeXtBlock.forward_parts``'s ``folded_mlp`` and ``depthwise_by_forward``."""


class patched:
    """``ConvNeXtBlock.forward`` of ``variant`` inside the ``with`` block."""

    def __init__(self, variant: str):
        folded, by_forward = FORWARDS[variant]

        def forward(block, x):
            return block.forward_parts(x, folded_mlp=folded, depthwise_by_forward=by_forward)

        self.forward = forward

    def __enter__(self):
        self.saved = seg_mod.ConvNeXtBlock.forward
        seg_mod.ConvNeXtBlock.forward = self.forward

    def __exit__(self, *exc):
        seg_mod.ConvNeXtBlock.forward = self.saved


# ------------------------------------------------------------------------ table 1
def conv_calls(conv: dict, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    """Forward, backward to the input and backward to the weight of one convolution."""
    fmt = torch.channels_last if conv["channels_last"] else torch.contiguous_format
    x = torch.randn(conv["input"], generator=gen).contiguous(memory_format=fmt)
    gy = torch.randn(conv["output"], generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(conv["weight"], generator=gen) * 0.1
    args = (list(conv["stride"]), list(conv["padding"]), [1, 1], False, [0, 0], conv["groups"])

    def back(mask):
        return lambda: torch.ops.aten.convolution_backward(gy, x, w, None, *args, mask)

    return {
        "forward": lambda: F.conv2d(x, w, None, conv["stride"], conv["padding"], 1,
                                    conv["groups"]),
        "input grad": back([True, False, False]),
        "weight grad": back([False, True, False]),
    }


def chunked_weight_grad(x: torch.Tensor, gy: torch.Tensor, k: int, chunk: int = 64
                        ) -> torch.Tensor:
    """The depthwise weight gradient as the package computed it from 1128490 to 26576e2:
    forward convolutions over at most ``chunk`` images × channels each, the input padded with
    ``F.pad``. Kept only to time the package's one call against."""
    b, c, h, w = x.shape
    p = k // 2
    step = max(1, chunk // c)
    d_w = None
    for i in range(0, b, step):
        xs, gs = x[i:i + step], gy[i:i + step]
        n = xs.shape[0]
        xp = F.pad(xs, (p, p, p, p)).reshape(1, n * c, h + 2 * p, w + 2 * p)
        part = F.conv2d(xp, gs.reshape(n * c, 1, h, w), groups=n * c).reshape(n, c, k, k).sum(0)
        d_w = part if d_w is None else d_w + part
    return d_w.unsqueeze(1)


def weight_grad_calls(conv: dict, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    """A 7×7 depthwise convolution's weight gradient: oneDNN's (as autograd gets it), the
    package's before (:func:`chunked_weight_grad`) and
    :func:`fuse4seg.models.segmentation.depthwise_weight_grad`."""
    calls = conv_calls(conv, gen)
    x = torch.randn(conv["input"], generator=gen).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(conv["output"], generator=gen).contiguous(memory_format=torch.channels_last)
    return {
        "oneDNN": calls["weight grad"],
        "chunks": lambda: chunked_weight_grad(x, gy, 7),
        "one call": lambda: seg_mod.depthwise_weight_grad(x, gy, 7),
    }


# ------------------------------------------------------------------------ table 2
def gradient_gaps(engine: Engine, x: torch.Tensor, seg: torch.Tensor) -> dict[str, float]:
    """Per variant: the largest difference of L_lower and of any gradient from ``autograd``'s,
    relative to the largest (same weights, same batch)."""
    grads, losses = {}, {}
    for variant in VARIANTS:
        net = copy.deepcopy(engine.follower_module).train()
        with patched(variant):
            loss = engine.lower_loss(net(x), seg)
            loss.backward()
        losses[variant] = float(loss.detach())
        grads[variant] = torch.cat([p.grad.flatten() for p in net.parameters()])
    ref = grads["autograd"]
    scale = float(ref.abs().max())
    return {v: max(abs(losses[v] - losses["autograd"]) / abs(losses["autograd"]),
                   float((grads[v] - ref).abs().max()) / scale) for v in VARIANTS}


def time_variants(engine: Engine, args) -> dict[str, dict[str, float]]:
    """Median ms of the warm-up step, a D_tr update and the outer step per variant, in turns."""
    engine._set_follower_rate("rollout")
    half = args.batch // 2
    x1, x2, seg = random_batch(args.batch, args.size, 0)
    x_in = engine.prior(x1, x2, "warmup", ema=False)
    tr = (x1[:half], x2[:half], seg[:half])
    val = (x1[half:], x2[half:], seg[half:])
    x_tr = engine.prior(tr[0], tr[1], "rollout", ema=False)
    steps = {
        "warm-up step": lambda: engine.follower_step(x_in, seg),
        "update on D_tr": lambda: engine.follower_step(x_tr, tr[2]),
        "outer step": lambda: outer_step(engine, tr, val, args.inner_steps),
    }
    times = {v: {s: [] for s in steps} for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            with patched(variant):
                for fn in steps.values():
                    fn()  # untimed
                for name, fn in steps.items():
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        fn()
                        times[variant][name].append(time.perf_counter() - start)
    return {v: {s: 1000 * statistics.median(t) for s, t in per.items()}
            for v, per in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--size", type=int, default=64, help="slice size")
    parser.add_argument("--batch", type=int, default=8, help="B (D_tr and D_val: B/2)")
    parser.add_argument("--inner-steps", type=int, default=3, help="K")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--onednn-verbose", action="store_true",
                        help="print oneDNN's kernels for the first depthwise shape")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.profile, args.size, args.batch, args.inner_steps)
    print(f"# probe_follower: {args.profile} follower, {args.size}x{args.size}, batch "
          f"{args.batch}, K {args.inner_steps}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.rounds} rounds x {args.repeats} calls\n")

    x = torch.rand(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with patched("autograd"):  # every convolution through its module, for the hooks
        convs = convolutions(engine.follower_module, x)
    gen = torch.Generator().manual_seed(0)
    print("CL: channels-last; n: convolutions of that shape in the follower; a depthwise "
          "convolution's weight is C×1×k×k\n")
    print("| input | weight | layout | n | forward (ms) | input grad (ms) | weight grad (ms) | "
          "weight grad / forward |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for conv in convs:
        t = timed_in_turns(conv_calls(conv, gen), args.rounds, args.repeats)
        ms = {k: 1000 * v for k, v in t.items()}
        shape = "×".join(map(str, conv["input"]))
        weight = "×".join(map(str, conv["weight"]))
        layout = "CL" if conv["channels_last"] else "NCHW"
        print(f"| {shape} | {weight} | {layout} | {conv['count']} | "
              f"{ms['forward']:.3f} | {ms['input grad']:.3f} | {ms['weight grad']:.3f} | "
              f"{ms['weight grad'] / ms['forward']:.1f} |", flush=True)
    depthwise = [c for c in convs if c["groups"] > 1 and c["weight"][-1] == 7]
    print("\n| depthwise 7×7 | oneDNN's weight grad (ms) | before: chunks of ≤ 64, `F.pad` "
          "(ms) | `depthwise_weight_grad`: one call (ms) | chunks / one call |")
    print("|---|---:|---:|---:|---:|")
    for conv in depthwise:
        t = timed_in_turns(weight_grad_calls(conv, gen), args.rounds, args.repeats)
        shape = "×".join(map(str, conv["input"]))
        print(f"| input {shape} | {1000 * t['oneDNN']:.3f} | {1000 * t['chunks']:.3f} | "
              f"{1000 * t['one call']:.3f} | {t['chunks'] / t['one call']:.2f} |", flush=True)
    if args.onednn_verbose:
        first = depthwise[0]
        calls = conv_calls(first, gen)
        print("\noneDNN's kernels for the first depthwise shape (forward, then weight grad):")
        sys.stdout.flush()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            calls["forward"]()
            calls["weight grad"]()
        sys.stdout.flush()

    x_in, _, seg = random_batch(args.batch, args.size, 2)
    gaps = gradient_gaps(engine, x_in, seg)
    times = time_variants(engine, args)
    print("\n| variant | warm-up step (ms) | × autograd | update on D_tr (ms) | × autograd | "
          "outer step (ms) | × autograd | largest gap to autograd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = times["autograd"]
    for variant in VARIANTS:
        t = times[variant]
        cells = " | ".join(f"{t[s]:.1f} | {base[s] / t[s]:.3f}" for s in base)
        print(f"| {variant} | {cells} | {gaps[variant]:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
