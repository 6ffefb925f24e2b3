"""Throughput of one outer step of Algorithm 1 and the projected time of the paper's schedule.

One *outer step* is what the trainer does per rollout batch: the leader's x_f on D_tr (once,
no grad), K follower steps on D_tr, one leader step on D_val (L_upper through the frozen
follower) and the EMA update. A *warm-up step* is one follower step on x_avg of the whole batch.
Both call the real :class:`fuse4seg.train.bilevel.Engine` step methods on random inputs.

Variants: ``eager`` (fp32, as ``FUSE4SEG_EAGER=1`` trains), ``cl`` (fp32, channels_last inputs
and weights), ``amp`` (bf16 autocast; CUDA only, as in training), ``amp_cl`` (AMP +
channels_last), ``compile`` (``train.compile=true``: the trainer's ``torch.compile`` of both
networks, with AMP on CUDA), ``compile_static`` (the same with ``dynamic=False``: one static
graph per batch shape instead of torch's second, dynamic-shape graph), ``compile_leader``
(only the leader compiled, ``dynamic=False``: the leader step's forward and backward, whose many
small normalisation, activation and attention ops are what a compiler fuses; the follower, the
inner loop's x_f and the leader's average stay eager), ``compile_graphs`` (both networks
compiled with ``mode="reduce-overhead"`` and ``dynamic=False``: inductor's kernels replayed as
CUDA graphs, so the host launches one graph instead of each kernel; each step starts with
``torch.compiler.cudagraph_mark_step_begin()``; on a CPU no graphs, a plain static compile;
AMP on CUDA), ``no_follower_ema``
(eager without ``train.follower_ema``: what the follower's weight average costs per step where
the profile sets it), ``loop_adamw`` (eager with torch's default AdamW instead of the fused
kernel the trainer uses, ``FUSE4SEG_ADAMW=loop``; on CUDA that default is its ``foreach``
path), ``nchw_leader`` (eager with the leader's weights in NCHW instead of the channels-last
layout :func:`fuse4seg.models.place_leader` gives them on a CPU, ``FUSE4SEG_LEADER_LAYOUT=nchw``).
On CPU AMP is off in training, so ``amp``/``amp_cl`` are skipped there, unless ``--cpu-bf16``
asks what CPU bf16 autocast would give (a measurement only: the trainer ignores ``train.amp``
on CPU). The variants are built
once and then timed in turns (``--rounds``), so that on a shared machine they see the same load;
the medians over all rounds are printed. ``first calls (s)`` is the time of the untimed first
calls of both step types: for ``compile`` it holds the compilation (or the load from inductor's
cache, ``TORCHINDUCTOR_CACHE_DIR``), reported apart from the steps.

On CUDA the table also gives the model FLOPs of each step (``FlopCounterMode``, counted once on
the eager engine) and the MFU against the card's dense bf16 peak (:data:`BF16_PEAK`; ``n/a``
for a card not in the table). ``peak GPU mem`` is each variant's own: the most memory allocated
during its timed calls, with every variant's engine still allocated beside it (their weights and
optimiser states, small beside a step's activations). Until 2026-12-04 that column held one
figure for the whole call, the same in every row (``RESULTS.md``, *The prepared GPU check*).
``--trace N --trace-variant NAME`` profiles NAME instead of the first variant.

Projection (printed with the table): E_warm · ⌈N/B⌉ warm-up steps + E_roll · ⌈N/B⌉ outer
steps, with the paper's E_warm = 40, E_roll = 120, B = 8 and N training slices. We assume
N = 100,000 (``--train-slices``): BraTS 2021 has 1,251 training cases; a 70/10/20 patient split
leaves ~876, and ~115 of 155 axial slices hold at least 5 % brain, i.e. ~100,000 slices — the
same order as "1,000 training patients × ~100 slices". Data loading is not included.

Usage::

    python benchmarks/bench_train_step.py --device cuda
    python benchmarks/bench_train_step.py --device cpu --profile default --size 80 --batch 8 \\
        --inner-steps 3 --variants eager,cl,compile --rounds 3
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import torch

from fuse4seg.config import get_config
from fuse4seg.train.bilevel import Engine
from fuse4seg.train.engine import compile_net
from fuse4seg.utils import env_switches

VARIANTS = ("eager", "cl", "amp", "amp_cl", "compile", "compile_static", "compile_leader",
            "compile_graphs",
            "no_follower_ema", "loop_adamw", "nchw_leader")

# dense bf16 peak (TFLOP/s) by a substring of torch.cuda.get_device_name(), first match wins
BF16_PEAK = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def bf16_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, ``None`` when unknown (or not CUDA)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK:
        if key in name:
            return tflops * 1e12
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build(args, variant: str, device: torch.device) -> Engine:
    overrides = {
        "data.crop_size": args.size,
        "train.batch_size": args.batch,
        "train.inner_steps": args.inner_steps,
        "train.amp": variant in ("amp", "amp_cl")
        or (variant.startswith("compile") and device.type == "cuda"),
        "train.compile": variant == "compile",
    }
    if variant == "no_follower_ema":  # eager without the follower's weight average
        overrides["train.follower_ema"] = None
    if args.fusion:
        overrides["model.fusion"] = args.fusion
    if args.segmentation:
        overrides["model.segmentation"] = args.segmentation
    config = get_config(args.profile, overrides)
    # the code before a CPU change, for this engine only: loop_adamw, torch's default AdamW
    # (engine.adamw reads FUSE4SEG_ADAMW); nchw_leader, the leader's weights in NCHW
    # (models.place_leader reads FUSE4SEG_LEADER_LAYOUT)
    before = {"loop_adamw": {"FUSE4SEG_ADAMW": "loop"},
              "nchw_leader": {"FUSE4SEG_LEADER_LAYOUT": "nchw"}}.get(variant, {})
    with env_switches(before):
        engine = Engine(config, "fuse4seg", device, steps_per_epoch=10**6)
    if variant in ("amp", "amp_cl") and device.type == "cpu":  # --cpu-bf16: measured only
        engine.amp_dtype = torch.bfloat16
    if variant == "compile_static":  # one static graph per shape (torch.compile's dynamic=False)
        engine.leader.net = compile_net(engine.leader.net, dynamic=False)
        engine.follower.net = compile_net(engine.follower.net, dynamic=False)
    if variant == "compile_graphs":  # CUDA graphs around the compiled graphs (CUDA only)
        for learner in (engine.leader, engine.follower):
            learner.net = torch.compile(learner.net, mode="reduce-overhead", dynamic=False)
    if variant == "compile_leader":  # the leader's training graph only
        engine.leader.net = compile_net(engine.leader.net, dynamic=False)
    if variant in ("cl", "amp_cl"):
        engine.leader.net = engine.leader.net.to(memory_format=torch.channels_last)
        engine.follower.net = engine.follower.net.to(memory_format=torch.channels_last)
    return engine


def inputs(args, device, channels_last: bool, n: int):
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(n, 1, args.size, args.size, generator=gen)
    x2 = torch.rand(n, 1, args.size, args.size, generator=gen)
    seg = torch.randint(0, 4, (n, args.size, args.size), generator=gen)
    x1, x2, seg = x1.to(device), x2.to(device), seg.to(device)
    if channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    return x1, x2, seg


def outer_step(engine: Engine, tr, val, k: int) -> None:
    x_tr = engine.prior(tr[0], tr[1], "rollout", ema=False)  # x_f on D_tr, once
    for _ in range(k):
        engine.follower_step(x_tr, tr[2])
    engine.leader_step(*val)


def warmup_step(engine: Engine, batch) -> None:
    x_in = engine.prior(batch[0], batch[1], "warmup", ema=False)
    engine.follower_step(x_in, batch[2])


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def count_flops(fn) -> float:
    """FLOPs of one call of ``fn`` (torch's counter: matmuls and convolutions, fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class Case:
    """One variant: its engine, its inputs and the times gathered over the rounds."""

    def __init__(self, args, variant: str, device: torch.device):
        self.variant = variant
        self.engine = build(args, variant, device)
        cl = variant in ("cl", "amp_cl")
        half = math.ceil(args.batch / 2)
        self.tr = inputs(args, device, cl, half)
        self.val = inputs(args, device, cl, args.batch - half)
        self.whole = inputs(args, device, cl, args.batch)
        self.k = args.inner_steps
        self.t_outer: list[float] = []
        self.t_warm: list[float] = []
        self.first = 0.0
        self.peak = 0  # bytes: the most allocated during this variant's timed calls (CUDA)

    def outer(self) -> None:
        self._mark()
        outer_step(self.engine, self.tr, self.val, self.k)

    def warm(self) -> None:
        self._mark()
        warmup_step(self.engine, self.whole)

    def _mark(self) -> None:
        """A new step for CUDA graph trees: the last step's graph outputs may be overwritten."""
        if self.variant == "compile_graphs":
            torch.compiler.cudagraph_mark_step_begin()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--size", type=int, default=240, help="slice size (paper: 240)")
    parser.add_argument("--batch", type=int, default=8, help="batch size B (paper: 8)")
    parser.add_argument("--inner-steps", type=int, default=5, help="K (paper: 5)")
    parser.add_argument("--profile", default="paper", help="model variants of this profile")
    parser.add_argument("--fusion", help="override the leader variant")
    parser.add_argument("--segmentation", help="override the follower variant")
    parser.add_argument("--variants", help=f"comma list of {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=1, help="turns over the variants")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="on CPU, run amp/amp_cl under bf16 autocast (training does not)")
    parser.add_argument("--train-slices", type=int, default=100_000, help="N for the projection")
    parser.add_argument("--trace", type=int, metavar="N", default=0,
                        help="after the table, torch.profiler's N ops with the most self time "
                        "in 3 warm-up and 3 outer steps of the first variant")
    parser.add_argument("--trace-variant", metavar="NAME",
                        help="the variant --trace profiles (default: the first that ran)")
    parser.add_argument("--warmup-epochs", type=int, default=40)
    parser.add_argument("--rollout-epochs", type=int, default=120)
    args = parser.parse_args(argv)

    from fuse4seg.utils import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            parser.error(f"unknown variants {bad}; choose from {VARIANTS}")
    else:
        variants = ["eager", "amp", "amp_cl", "compile"] if device.type == "cuda" else ["eager"]
    steps = math.ceil(args.train_slices / args.batch)
    print(
        f"# bench_train_step: {_machine(device)}, torch {torch.__version__}, "
        f"{args.size}x{args.size}, batch {args.batch} (D_tr {math.ceil(args.batch / 2)}, "
        f"D_val {args.batch // 2}), K {args.inner_steps}, profile {args.profile}, "
        f"{args.rounds} round(s) x {args.repeats} timed calls\n"
        f"# projection: {args.warmup_epochs} warm-up + {args.rollout_epochs} rollout epochs x "
        f"{steps} steps (N = {args.train_slices:,} training slices assumed)",
        flush=True,
    )
    cases: list[Case] = []
    notes: dict[str, str] = {}
    for variant in variants:
        if variant in ("amp", "amp_cl") and device.type != "cuda" and not args.cpu_bf16:
            notes[variant] = "skipped: AMP is off on CPU in training"
            continue
        try:
            case = Case(args, variant, device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.warmup):
                case.outer()
                case.warm()
            _sync(device)
            case.first = time.perf_counter() - start
            cases.append(case)
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            message = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            notes[variant] = f"failed: {type(exc).__name__}: {message}"
    flops_outer = flops_warm = None
    peak = bf16_peak(device)
    if device.type == "cuda" and cases:
        probe = cases[0]
        flops_outer, flops_warm = count_flops(probe.outer), count_flops(probe.warm)
        print(
            f"# model FLOPs per step (FlopCounterMode): outer {flops_outer / 1e12:.3f} TFLOP, "
            f"warm-up {flops_warm / 1e12:.3f} TFLOP; bf16 peak "
            f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a (card not in the table)'}",
            flush=True,
        )
    for r in range(args.rounds):
        order = cases if r % 2 == 0 else cases[::-1]
        for case in order:
            if device.type == "cuda":  # each variant's own peak (every engine stays allocated)
                torch.cuda.reset_peak_memory_stats(device)
            case.t_outer += timed(case.outer, device, args.repeats)
            case.t_warm += timed(case.warm, device, args.repeats)
            if device.type == "cuda":
                case.peak = max(case.peak, torch.cuda.max_memory_allocated(device))
    eager = next((c for c in cases if c.variant == "eager"), None)
    base_outer = statistics.median(eager.t_outer) if eager else None
    base_warm = statistics.median(eager.t_warm) if eager else None
    print(
        "\n| variant | outer step (ms) | × eager | slices/s | warm-up step (ms) | × eager "
        "| first calls (s) | MFU outer / warm-up | peak GPU mem (GiB) | projected hours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        case = next((c for c in cases if c.variant == variant), None)
        if case is None:
            print(f"| {variant} | {notes.get(variant, 'not run')} | | | | | | | | |")
            continue
        t_outer = statistics.median(case.t_outer)
        t_warm = statistics.median(case.t_warm)
        r_outer = f"{base_outer / t_outer:.2f}" if base_outer else "-"
        r_warm = f"{base_warm / t_warm:.2f}" if base_warm else "-"
        if peak and flops_outer and flops_warm:
            mfu = (
                f"{100 * flops_outer / t_outer / peak:.1f} % / "
                f"{100 * flops_warm / t_warm / peak:.1f} %"
            )
        else:
            mfu = "n/a"
        hours = args.warmup_epochs * steps * t_warm + args.rollout_epochs * steps * t_outer
        mem = f"{case.peak / 2**30:.1f}" if device.type == "cuda" else "-"
        print(
            f"| {variant} | {1000 * t_outer:.1f} | {r_outer} | {args.batch / t_outer:.1f} | "
            f"{1000 * t_warm:.1f} | {r_warm} | {case.first:.1f} | {mfu} | {mem} | "
            f"{hours / 3600:.1f} |"
        )
    if args.trace and cases:
        traced = next((c for c in cases if c.variant == args.trace_variant), cases[0])
        if args.trace_variant and traced.variant != args.trace_variant:
            print(f"\n# --trace-variant {args.trace_variant} did not run: "
                  f"tracing {traced.variant}")
        trace(traced, args.trace)
    sys.stdout.flush()
    return 0


def profiled(fn, device: torch.device, calls: int = 3, record_shapes: bool = False):
    """``torch.profiler`` over ``calls`` calls of ``fn`` (with CUDA activity on a GPU):
    ``(profile, wall seconds of those calls)`` and the key to sort its table by (self CUDA
    time on a GPU, else self CPU time). Against the table's self CUDA total, the wall time
    says how much of it the GPU was busy. Also used by ``probe_gpu_leader.py``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall = time.perf_counter() - start
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof, wall, key


def trace(case: Case, rows: int) -> None:
    """Print where a variant's step time goes: ``torch.profiler``'s ops by self time."""
    device = case.tr[0].device
    for name, fn in (("warm-up", case.warm), ("outer", case.outer)):
        prof, wall, key = profiled(fn, device)
        print(f"\n# {case.variant}: 3 {name} steps ({1000 * wall:.0f} ms of wall time under "
              "the profiler), ops by self time")
        print(prof.key_averages().table(sort_by=key, row_limit=rows))

if __name__ == "__main__":
    sys.exit(main())
