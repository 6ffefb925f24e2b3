"""Parameters, FLOPs and forward / forward+backward time of every registered network.

    python benchmarks/bench_models.py [--device cpu|cuda] [--amp] [--size 240] [--batch 1]
                                      [--repeats 3] [--models fuse4seg_tiny,convnext_unet_paper]

For each registered fusion leader (input: one pair x1, x2 of ``size × size`` slices) and
segmentation follower (input: one ``size × size`` fused slice, ``in_channels=1``) it prints a
Markdown row: trainable parameters, GFLOPs per slice (forward pass, batch 1, counted by
``torch.utils.flop_counter.FlopCounterMode``: convolutions, matrix products and attention;
element-wise operations are not counted), milliseconds of a forward pass (``eval``, no grad)
and of a forward + backward pass (``train``, gradient of the sum of the outputs) per batch of
``--batch`` slices. ``--amp`` runs under ``torch.autocast`` in bfloat16 (the paper trains with
AMP); timings synchronise the GPU before reading the clock and follow warm-up iterations. On
CPU the ``*_paper`` variants are timed once (after the FLOP-counting forward pass, which warms
them up) so that the whole table takes a few minutes on a 2-core machine. Copy the table, with
the machine line, into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fuse4seg.models import (
    count_parameters,
    create_fusion,
    create_segmentation,
    list_fusion_models,
    list_segmentation_models,
)
from fuse4seg.utils import env_switches

PER_HEAD = {"FUSE4SEG_ATTENTION": "autograd"}
"""The switch under which :func:`_gflops` counts: the leader's attention per head."""


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()} / {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    text += f", {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _inputs(kind: str, batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    if kind == "fusion":
        return tuple(torch.rand(batch, 1, size, size, generator=gen).to(device) for _ in range(2))
    return (torch.rand(batch, 1, size, size, generator=gen).to(device),)


def _scalar(out) -> torch.Tensor:
    if isinstance(out, tuple):  # leader: (x_fused, feats)
        x_fused, feats = out
        return x_fused.float().sum() + sum(f.float().mean() for f in feats)
    return out.float().sum()


def _gflops(model: torch.nn.Module, kind: str, size: int, device, amp: bool) -> float:
    """GFLOPs of one forward, counted on the leader's per-head attention on every device (on
    a CPU the package's own form multiplies h× the Gram entries, masked: the same model, more
    counted FLOPs)."""
    inputs = _inputs(kind, 1, size, device)
    model.eval()
    counter = FlopCounterMode(display=False)
    with (torch.no_grad(), _autocast(device, amp), counter,
          env_switches(PER_HEAD)):
        model(*inputs)
    return counter.get_total_flops() / 1e9


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench(name: str, kind: str, args, device: torch.device) -> dict:
    """Measure one registered model; returns the table row as a dict."""
    torch.manual_seed(0)
    model = (create_fusion(name) if kind == "fusion" else create_segmentation(name)).to(device)
    params = count_parameters(model)
    gflops = _gflops(model, kind, args.size, device, args.amp)
    inputs = _inputs(kind, args.batch, args.size, device)
    repeats = args.repeats
    warmup = args.warmup
    if device.type == "cpu" and name.endswith("_paper"):
        # a single timed run; the FLOP-counting forward above has already warmed up
        repeats, warmup = 1, 0

    def forward():
        model.eval()
        with torch.no_grad(), _autocast(device, args.amp):
            model(*inputs)

    def forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        with _autocast(device, args.amp):
            loss = _scalar(model(*inputs))
        loss.backward()

    fwd = _time(forward, device, warmup, repeats)
    fwd_bwd = _time(forward_backward, device, warmup, repeats)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return dict(
        model=name, params=params, gflops=gflops, fwd=fwd, fwd_bwd=fwd_bwd, repeats=repeats,
        peak=peak,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (the paper's AMP)")
    parser.add_argument("--size", type=int, default=240, help="slice side (default 240)")
    parser.add_argument("--batch", type=int, default=1, help="slices per timed batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.size < 16 or args.size % 16:
        parser.error(f"--size {args.size}: must be a positive multiple of 16 (follower stride)")
    if args.repeats < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--repeats and --batch must be >= 1, --warmup >= 0")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    todo = [(n, "fusion") for n in list_fusion_models()]
    todo += [(n, "segmentation") for n in list_segmentation_models()]
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - {n for n, _ in todo})
        if unknown:
            parser.error(f"--models: unknown {unknown}; registered: {[n for n, _ in todo]}")
        todo = [(n, k) for n, k in todo if n in wanted]

    precision = "bf16 autocast" if args.amp else "fp32"
    print(f"machine: {_machine(device)}")
    print(
        f"device: {device}; {precision}; slice {args.size}x{args.size}; batch {args.batch}; "
        f"median of --repeats {args.repeats} after {args.warmup} warm-up runs "
        f"(on CPU the *_paper variants: one run after the FLOP-counting pass)\n"
    )
    header = "| model | params | GFLOPs / slice (fwd) | fwd ms / batch | fwd+bwd ms / batch |"
    rule = "|---|---:|---:|---:|---:|"
    if device.type == "cuda":
        header += " peak MiB (fwd+bwd) |"
        rule += "---:|"
    print(header)
    print(rule, flush=True)
    for name, kind in todo:
        r = bench(name, kind, args, device)
        row = (
            f"| {r['model']} | {r['params']:,} | {r['gflops']:.2f} | {r['fwd']:.1f} | "
            f"{r['fwd_bwd']:.1f} |"
        )
        if r["peak"] is not None:
            row += f" {r['peak']:.0f} |"
        print(row, flush=True)
    print(
        "\nleader rows: one slice = one (T1ce, FLAIR) pair through Φ; follower rows: one fused "
        "slice through Ψ (in_channels=1). FLOPs count convolutions, matrix products and "
        "attention only."
    )


if __name__ == "__main__":
    main()
