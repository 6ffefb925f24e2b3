"""Does ``torch.compile`` lose on a CPU only because of the depthwise convolutions' backward?
(issue 9, part 1)

``train.compile`` made the CPU steps slower in every earlier measurement (``RESULTS.md``, "Part 1
at a glance"). One suspect: eager training computes each ConvNeXt block's 7×7 depthwise
gradients as forward convolutions (``_DepthwiseByForward``; one call of its weight gradient
was 1.6-4.2× faster than oneDNN's at every follower shape), while a compiled graph traces the
block's plain ops and so gets oneDNN's slow backward back. This probe times one follower
forward and backward (a mean-square loss on the logits) in four arms, each in a fresh process:

- ``eager``: the package as it trains (its CPU rewrites on);
- ``eager_plain``: eager with ``FUSE4SEG_CONVNEXT=autograd`` (the plain ops a compiled graph
  traces);
- ``compile``: ``torch.compile`` of the follower (``dynamic=False``: this probe has one shape;
  at the smallest sizes a dynamic graph of the opaque op failed to compile);
- ``compile_opaque``: ``torch.compile`` with each block's depthwise convolution as an opaque
  operator (:func:`opaque_depthwise`, a ``torch.library`` custom op) whose backward is the
  package's forward-convolution gradients, so that inductor compiles the rest of the block
  (LayerNorm, the MLP's GELU and GRN, the residual) and keeps the fast depthwise backward.

The arms run in turns (the order reversed every round), all compiling into one inductor cache
made for the call, so the first round's compilation is cold and later rounds load it; "first
calls" is the time of the untimed first calls (compilation included). ``--kernels N`` runs one
more ``compile_opaque`` process after the timed ones, with inductor's kernel profiling on, and
prints its N largest generated kernels by self time (the timed processes run without it).
A measurement only: nothing here changes training.

Usage::

    python benchmarks/probe_compile_follower.py --size 80 --batch 8 --rounds 2 --kernels 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ARMS = ("eager", "eager_plain", "compile", "compile_opaque")
ROOT = Path(__file__).resolve().parents[1]
_OPS: dict = {}


def opaque_depthwise():
    """The custom op ``fuse4seg_probe::depthwise`` (registered on first call): a k×k depthwise
    convolution (padding k // 2, bias) whose backward is another opaque op that calls
    ``_DepthwiseByForward.backward``, the package's own gradients (∂L/∂x as a forward
    convolution with the flipped kernel, ∂L/∂W by ``depthwise_weight_grad``)."""
    if "depthwise" in _OPS:
        return _OPS["depthwise"]
    from fuse4seg.models.segmentation import _DepthwiseByForward

    @torch.library.custom_op("fuse4seg_probe::depthwise", mutates_args=())
    def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _DepthwiseByForward.forward(SimpleNamespace(save_for_backward=lambda *t: None),
                                           x, weight, bias)

    @depthwise.register_fake
    def _(x, weight, bias):
        return torch.empty_like(x)

    @torch.library.custom_op("fuse4seg_probe::depthwise_backward", mutates_args=())
    def depthwise_backward(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor
                           ) -> list[torch.Tensor]:
        ctx = SimpleNamespace(saved_tensors=(x, weight), needs_input_grad=(True, True, True))
        return list(_DepthwiseByForward.backward(ctx, gy))

    @depthwise_backward.register_fake
    def _(x, weight, gy):
        return [torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        return tuple(depthwise_backward(x, weight, gy.contiguous(memory_format=layout)))

    depthwise.register_autograd(backward, setup_context=setup_context)
    _OPS["depthwise"] = depthwise
    return depthwise


class OpaqueDepthwise(nn.Module):
    """A ConvNeXt block's ``dwconv`` (its weight and bias) run as :func:`opaque_depthwise`.

    A compiled block runs its plain forward (``ConvNeXtBlock.forward_parts`` without the CPU
    rewrites, which stay out of traced graphs), which calls ``dwconv(x)``: swapping this module
    in is all the ``compile_opaque`` arm changes. The op is called through ``torch.ops``,
    registered before tracing: registering inside a traced frame broke the graph at every
    block."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fuse4seg_probe.depthwise(x, self.weight, self.bias)


def use_opaque_depthwise(net: nn.Module) -> nn.Module:
    """``net`` with every ConvNeXt block's ``dwconv`` replaced by :class:`OpaqueDepthwise`."""
    from fuse4seg.models.segmentation import ConvNeXtBlock

    opaque_depthwise()
    for module in net.modules():
        if isinstance(module, ConvNeXtBlock):
            module.dwconv = OpaqueDepthwise(module.dwconv)
    return net


def run_arm(arm: str, args) -> dict:
    """Build the follower, make the first calls, time ``--repeats`` forward and backward calls
    (this process only)."""
    from fuse4seg.models.registry import create_segmentation

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = create_segmentation(args.segmentation, in_channels=1)
    if arm == "compile_opaque":
        use_opaque_depthwise(net)
    if arm.startswith("compile"):
        if args.kernels:
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        net = torch.compile(net, dynamic=False)  # one shape here: one static graph
    x = torch.rand(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))

    def call():
        net.zero_grad(set_to_none=True)
        net(x).square().mean().backward()

    start = time.perf_counter()
    for _ in range(args.warmup):
        call()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    out = {"arm": arm, "first_s": first, "ms": [1000 * t for t in times]}
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                call()
        rows = [(e.key, e.self_cpu_time_total / 3000, e.count // 3)
                for e in prof.key_averages() if "cpp_fused" in e.key]
        rows.sort(key=lambda r: -r[1])
        out["kernels"] = rows[: args.kernels]
        out["kernels_ms"] = sum(r[1] for r in rows)
    return out


def spawn(arm: str, args, cache: str, kernels: int = 0) -> dict:
    """``run_arm`` in a fresh process (``FUSE4SEG_CONVNEXT=autograd`` for ``eager_plain``),
    with inductor's kernel profiling and listing when ``kernels`` > 0 (compiled arms only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSE4SEG_")}
    env.update(TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    if arm == "eager_plain":
        env["FUSE4SEG_CONVNEXT"] = "autograd"
    argv = [sys.executable, __file__, "--child", arm, "--size", str(args.size),
            "--batch", str(args.batch), "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--segmentation", args.segmentation, "--kernels", str(kernels)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"probe_compile_follower: arm {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--segmentation", default="convnext_unet_small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", type=int, default=0, help="print inductor's N largest")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_arm(args.child, args)))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        parser.error(f"--arms: unknown {unknown or 'empty list'}; choose from {', '.join(ARMS)}")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="f4s_inductor_") as cache:
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                got = spawn(arm, args, cache)
                results[arm].append(got)
                print(f"# round {r + 1}, {arm}: median {statistics.median(got['ms']):.1f} ms, "
                      f"first calls {got['first_s']:.1f} s", flush=True)
        listed = spawn("compile_opaque", args, cache, args.kernels) if args.kernels else {}
    print(f"\n# follower `{args.segmentation}` forward + backward, {args.size}×{args.size}, "
          f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.rounds} process(es) per arm × {args.repeats} timed calls\n")
    base = statistics.median(t for got in results[arms[0]] for t in got["ms"])
    print(f"| arm | median (ms) | per process (ms) | × {arms[0]} | first calls (s) |")
    print("|---|---:|---|---:|---|")
    for arm in arms:
        med = statistics.median(t for got in results[arm] for t in got["ms"])
        each = " / ".join(f"{statistics.median(g['ms']):.1f}" for g in results[arm])
        first = " / ".join(f"{g['first_s']:.1f}" for g in results[arm])
        print(f"| {arm} | {med:.1f} | {each} | {base / med:.2f} | {first} |")
    if listed.get("kernels"):
        print(f"\n# compile_opaque, one more process with inductor's kernel profiling (not "
              f"timed above): its generated kernels take {listed['kernels_ms']:.1f} ms of self "
              "time per call; the largest:\n")
        print("| kernel | ms per call | launches per call |")
        print("|---|---:|---:|")
        for name, ms, count in listed["kernels"]:
            print(f"| `{name[:90]}` | {ms:.2f} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
