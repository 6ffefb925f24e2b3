"""Four CPU levers for the outer step (issue 9, part 1): three adopted, one not, each measured.

    python benchmarks/probe_cpu_levers.py [--profile default] [--size 80] [--batch 8]
        [--inner-steps 3] [--rounds 6] [--repeats 5] [--threads 2]

The outer step's trace (``bench_train_step.py --trace``) shows GELU, ``linalg_vector_norm`` and
layer norm among its larger items. Each lever is timed against the other form in one process,
the two forms in turns (``bench_layout.timed_in_turns``: the order reversed every round,
medians), because the machine's speed drifts between processes by more than these effects.
Ratios are before / shipped for the adopted levers and shipped / lever for the third; above 1,
the second form is faster:

1. **The leader's gated feed-forward on a dense gate** (adopted 2026-12-06;
   ``FUSE4SEG_GATE=strided`` is the code before). On a CPU the leader's maps are channels-last
   (``models.place_leader``), so ``GatedFeedForward``'s ``chunk(2, dim=1)`` gives two strided
   halves. Per shape met in the leader (recorded by hooks): GELU(gate) · value, forward and
   backward, on the strided halves against the gate copied dense first; then the whole outer
   step with the switch set and unset, and the largest difference of the leader's x_f between
   the two.
2. **GRN's ‖a‖ in ``_FoldedMLP`` as the root of a sum of squares** (adopted 2026-12-06;
   ``FUSE4SEG_GRN_NORM=vector_norm`` is the code before). Per ConvNeXt block shape of the
   follower, ``a (B, H·W, 4C)``: ``torch.linalg.vector_norm(a, dim=1)`` against
   ``segmentation._pixel_norm``; then the block's forward and backward with the switch set and
   unset.
3. **A LayerNorm over the channels as matrix products** (not adopted; mean and variance as
   products with a ``(C, 1)`` vector of ``1/C``), forward only and without grad, against
   ``F.layer_norm``, per LayerNorm input shape of both networks.

4. **The leader's attention with a hand-written backward** (adopted 2026-12-06, later;
   ``FUSE4SEG_ATTENTION=autograd`` is the code before). Per ``TransposedAttention`` input shape
   met in the leader: the module's forward and backward as autograd runs the per-head form
   against ``fusion._ChannelAttention``; then the whole outer step with the switch set and
   unset, and the largest difference of the leader's x_f between the two.

Last, the three adopted levers together: the warm-up step and the outer step with every switch
set (the code before) against none (shipped).

A measurement only: every switch is restored when its call returns.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layout import timed_in_turns  # noqa: E402
from bench_train_step import outer_step, warmup_step  # noqa: E402
from step_anatomy import build_engine, random_batch  # noqa: E402

from fuse4seg.models import fusion as fusion_mod  # noqa: E402
from fuse4seg.models import segmentation as seg_mod  # noqa: E402
from fuse4seg.models.layers import LayerNorm2d  # noqa: E402
from fuse4seg.utils import env_switches  # noqa: E402

CL = torch.channels_last
BEFORE = {"gate": {"FUSE4SEG_GATE": "strided"}, "norm": {"FUSE4SEG_GRN_NORM": "vector_norm"},
          "attention": {"FUSE4SEG_ATTENTION": "autograd"}}
"""Each adopted lever's switch back to the code before it."""


@contextlib.contextmanager
def before(*levers: str):
    """The code before the named levers (their switches set) inside the ``with`` block."""
    switches = {k: v for lever in levers for k, v in BEFORE[lever].items()}
    with env_switches(switches):
        yield


def in_code_before(fn: Callable[[], object], *levers: str) -> Callable[[], None]:
    """``fn`` as a call that runs it in the code before the named levers."""
    def call():
        with before(*levers):
            fn()
    return call


def _shapes(net: nn.Module, kind: type, run: Callable[[], object], output: bool = False
            ) -> list[tuple]:
    """The distinct ``(shape, channels-last, count)`` of the inputs (or outputs) of the
    ``kind`` modules of ``net`` in one ``run()`` without grad, in the order first met."""
    seen: dict[tuple, int] = {}

    def hook(module, args, out):
        t = out if output else args[0]
        cl = bool(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=CL))
        seen[(tuple(t.shape), cl)] = seen.get((tuple(t.shape), cl), 0) + 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [(shape, cl, n) for (shape, cl), n in seen.items()]


def _make(shape, cl: bool, gen: torch.Generator, grad: bool = False) -> torch.Tensor:
    t = torch.randn(shape, generator=gen)
    if cl:
        t = t.contiguous(memory_format=CL)
    return t.requires_grad_(grad)


def gate_calls(shape, cl: bool, gen) -> dict[str, Callable[[], None]]:
    """GELU(gate) · value on the two halves of a ``(B, 2h, H, W)`` map, forward and backward."""
    t = _make(shape, cl, gen, grad=True)
    g_out = _make((shape[0], shape[1] // 2, *shape[2:]), cl, gen)

    def strided():
        gate, value = t.chunk(2, dim=1)
        (F.gelu(gate) * value).backward(g_out)

    def shipped():  # the package's own rule for when to copy (GatedFeedForward)
        gate, value = t.chunk(2, dim=1)
        if fusion_mod._copy_gate(gate):
            gate = gate.contiguous(memory_format=CL)
        (F.gelu(gate) * value).backward(g_out)

    return {"strided (before)": strided, "dense gate (shipped)": shipped}


def norm_calls(shape, gen) -> dict[str, Callable[[], None]]:
    a = torch.randn(shape, generator=gen).abs()
    return {"vector_norm (before)": lambda: torch.linalg.vector_norm(a, dim=1, keepdim=True),
            "sum of squares (shipped)": lambda: seg_mod._pixel_norm(a)}


def block_calls(block: nn.Module, shape, cl: bool, gen) -> dict[str, Callable[[], None]]:
    x = _make(shape, cl, gen, grad=True)
    g = _make(shape, cl, gen)

    def shipped():
        block(x).backward(g)

    return {"vector_norm (before)": in_code_before(shipped, "norm"), "shipped": shipped}


def module_calls(module: nn.Module, shape, cl: bool, gen, lever: str
                 ) -> dict[str, Callable[[], None]]:
    """``module``'s forward and backward on a ``shape`` input, in the code before ``lever`` and
    as shipped."""
    x = _make(shape, cl, gen, grad=True)
    g = _make(shape, cl, gen)

    def shipped():
        module(x).backward(g)

    return {"before": in_code_before(shipped, lever), "shipped": shipped}


def layer_norm_calls(shape, gen) -> dict[str, Callable[[], None]]:
    c = shape[-1]
    x = torch.randn(shape, generator=gen)
    w, b = torch.ones(c), torch.zeros(c)
    avg = torch.full((c, 1), 1.0 / c)

    def by_products():
        mean = x @ avg
        d = x - mean
        var = (d * d) @ avg
        return torch.addcmul(b, d * torch.rsqrt(var + 1e-5), w)

    with torch.no_grad():
        ref = F.layer_norm(x, (c,), w, b, 1e-5)
        assert torch.allclose(by_products(), ref, atol=1e-4), "the product form is wrong"
    return {"F.layer_norm (shipped)": torch.no_grad()(lambda: F.layer_norm(x, (c,), w, b)),
            "as products": torch.no_grad()(by_products)}


def _row(label: str, n: int, t: dict[str, float]) -> str:
    (a, ta), (b, tb) = t.items()
    return f"| {label} | {n} | {1e3 * ta:.3f} | {1e3 * tb:.3f} | {ta / tb:.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--size", type=int, default=80, help="slice size")
    parser.add_argument("--batch", type=int, default=8, help="B (D_tr and D_val: B/2)")
    parser.add_argument("--inner-steps", type=int, default=3, help="K")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.profile, args.size, args.batch, args.inner_steps)
    leader, follower = engine.leader.net, engine.follower.net
    print(f"# probe_cpu_levers: {args.profile}, {args.size}x{args.size}, batch {args.batch}, "
          f"K {args.inner_steps}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.repeats} calls, medians; ratio: first form / second "
          "(> 1: the second is faster)\n")
    half = args.batch // 2
    x1, x2, seg = random_batch(args.batch, args.size, 0)
    gen = torch.Generator().manual_seed(0)

    print("## 1. The leader's gated feed-forward: GELU(gate) · value, forward + backward\n")
    print("| dwconv output | n | strided, before (ms) | dense gate, shipped (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")

    def leader_prior():
        engine.prior(x1[:half], x2[:half], "rollout", ema=False)

    gated = nn.ModuleList(m.dwconv for m in leader.modules()
                          if isinstance(m, fusion_mod.GatedFeedForward))
    # the dwconvs' outputs are the maps that chunk splits
    shapes = _shapes(gated, nn.Module, leader_prior, output=True)
    for shape, cl, n in shapes:
        t = timed_in_turns(gate_calls(shape, cl, gen), args.rounds, args.repeats)
        print(_row("×".join(map(str, shape)) + (" CL" if cl else ""), n, t), flush=True)

    tr = (x1[:half], x2[:half], seg[:half])
    val = (x1[half:], x2[half:], seg[half:])

    def outer():
        outer_step(engine, tr, val, args.inner_steps)

    def outer_row(before_label: str, shipped_label: str, lever: str) -> None:
        """The outer step in the code before ``lever`` and as shipped, and the largest
        difference of x_f between the two."""
        engine._set_follower_rate("rollout")
        with torch.no_grad():
            shipped_xf = engine.prior(*tr[:2], "rollout", ema=False)
            with before(lever):
                before_xf = engine.prior(*tr[:2], "rollout", ema=False)
        diff = float((shipped_xf - before_xf).abs().max())
        t = timed_in_turns({"before": in_code_before(outer, lever), "shipped": outer},
                           args.rounds, args.repeats)
        print(f"\n| outer step | {before_label} (ms) | {shipped_label} (ms) | ratio | largest "
              "x_f difference |")
        print("|---|---:|---:|---:|---:|")
        print(f"| {args.size}×{args.size}, B {args.batch}, K {args.inner_steps} | "
              f"{1e3 * t['before']:.1f} | {1e3 * t['shipped']:.1f} | "
              f"{t['before'] / t['shipped']:.3f} | {diff:.1e} |", flush=True)

    outer_row("strided, before", "dense gate, shipped", "gate")

    print("\n## 2. ‖a‖ in the follower's folded MLP\n")
    print("| a | n | vector_norm, before (ms) | sum of squares, shipped (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    blocks = {tuple(shape): (cl, n) for shape, cl, n in
              _shapes(follower, seg_mod.ConvNeXtBlock, lambda: follower(x1))}
    first = {}
    for m in follower.modules():
        if isinstance(m, seg_mod.ConvNeXtBlock):
            first.setdefault(m.dwconv.in_channels, m)
    for (b, c, h, w), (_cl, n) in blocks.items():
        expansion = first[c].pw1.out_features // c
        shape = (b, h * w, expansion * c)
        t = timed_in_turns(norm_calls(shape, gen), args.rounds, args.repeats)
        print(_row("×".join(map(str, shape)), n, t), flush=True)
    print("\n| ConvNeXt block input | n | block fwd + bwd, vector_norm, before (ms) | shipped "
          "(ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for shape, (cl, n) in blocks.items():
        block = first[shape[1]]
        t = timed_in_turns(block_calls(block, shape, cl, gen), args.rounds, args.repeats)
        print(_row("×".join(map(str, shape)) + (" CL" if cl else ""), n, t), flush=True)

    print("\n## 3. LayerNorm over the channels, forward without grad\n")
    print("| input (…, C) | n | F.layer_norm, shipped (ms) | as products (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    # the follower's nn.LayerNorm gets (B, H, W, C); the leader's LayerNorm2d (B, C, H, W),
    # which it normalises as the permuted (B, H, W, C)
    norms = _shapes(follower, nn.LayerNorm, lambda: follower(x1)) + [
        ((b, h, w, c), cl, n) for (b, c, h, w), cl, n in
        _shapes(leader, LayerNorm2d, leader_prior)]
    for shape, _cl, n in norms:
        t = timed_in_turns(layer_norm_calls(shape, gen), args.rounds, args.repeats)
        print(_row("×".join(map(str, shape)), n, t), flush=True)

    print("\n## 4. The leader's attention, forward + backward\n")
    print("| attention input | n | autograd, before (ms) | _ChannelAttention, shipped (ms) "
          "| ratio |")
    print("|---|---:|---:|---:|---:|")
    attentions = {}  # one module per channel count
    for m in leader.modules():
        if isinstance(m, fusion_mod.TransposedAttention):
            attentions.setdefault(m.qkv.in_channels, m)
    for shape, cl, n in _shapes(leader, fusion_mod.TransposedAttention, leader_prior):
        t = timed_in_turns(module_calls(attentions[shape[1]], shape, cl, gen, "attention"),
                           args.rounds, args.repeats)
        print(_row("×".join(map(str, shape)) + (" CL" if cl else ""), n, t), flush=True)
    outer_row("autograd, before", "shipped", "attention")

    print("\n## 5. The three adopted levers together: whole steps\n")
    print("| step | all switched off, before (ms) | shipped (ms) | ratio |")
    print("|---|---:|---:|---:|")
    rows = (("warm-up", "warmup", lambda: warmup_step(engine, (x1, x2, seg)), ""),
            ("outer", "rollout", outer, f", K {args.inner_steps}"))
    for name, stage, fn, k in rows:
        engine._set_follower_rate(stage)  # the step's own follower rate (as in training)
        t = timed_in_turns({"before": in_code_before(fn, *BEFORE), "shipped": fn},
                           args.rounds, args.repeats)
        print(f"| {name}, {args.size}×{args.size}, B {args.batch}{k} | "
              f"{1e3 * t['before']:.1f} | {1e3 * t['shipped']:.1f} | "
              f"{t['before'] / t['shipped']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
