"""Throughput of one outer step of Algorithm 1 and the projected time of the paper's schedule.

One *outer step* is what the trainer does per rollout batch: the leader's x_f on D_tr (once,
no grad), K follower steps on D_tr, one leader step on D_val (L_upper through the frozen
follower) and the EMA update. A *warm-up step* is one follower step on x_avg of the whole batch.
Both call the real :class:`fuse4seg.train.bilevel.Engine` step methods on random inputs.

Variants: ``eager`` (fp32), ``amp`` (bf16 autocast; CUDA only, as in training), ``amp_cl``
(AMP + channels_last inputs and weights), ``compile`` (``torch.compile`` of both networks, with
AMP on CUDA). On CPU, AMP is off in training, so ``amp``/``amp_cl`` are skipped there, and
``compile`` runs only when named with ``--variants``.

Projection (printed with the table): E_warm · ⌈N/B⌉ warm-up steps + E_roll · ⌈N/B⌉ outer
steps, with the paper's E_warm = 40, E_roll = 120, B = 8 and N training slices. We assume
N = 100,000 (``--train-slices``): BraTS 2021 has 1,251 training cases; a 70/10/20 patient split
leaves ~876, and ~115 of 155 axial slices hold at least 5 % brain, i.e. ~100,000 slices — the
same order as "1,000 training patients × ~100 slices". Data loading is not included.

Usage::

    python benchmarks/bench_train_step.py --device cuda
    python benchmarks/bench_train_step.py --device cpu --size 64 --profile smoke
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

VARIANTS = ("eager", "amp", "amp_cl", "compile")


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
        or (variant == "compile" and device.type == "cuda"),
    }
    if args.fusion:
        overrides["model.fusion"] = args.fusion
    if args.segmentation:
        overrides["model.segmentation"] = args.segmentation
    config = get_config(args.profile, overrides)
    engine = Engine(config, "fuse4seg", device, steps_per_epoch=10**6)
    if variant == "amp_cl":
        engine.leader.net = engine.leader.net.to(memory_format=torch.channels_last)
        engine.follower.net = engine.follower.net.to(memory_format=torch.channels_last)
    if variant == "compile":
        engine.leader.net = torch.compile(engine.leader.net)
        engine.follower.net = torch.compile(engine.follower.net)
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


def timed(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--train-slices", type=int, default=100_000, help="N for the projection")
    parser.add_argument("--warmup-epochs", type=int, default=40)
    parser.add_argument("--rollout-epochs", type=int, default=120)
    args = parser.parse_args(argv)

    from fuse4seg.utils import resolve_device

    device = resolve_device(args.device)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            parser.error(f"unknown variants {bad}; choose from {VARIANTS}")
    else:
        variants = list(VARIANTS) if device.type == "cuda" else ["eager"]
    steps = math.ceil(args.train_slices / args.batch)
    print(
        f"# bench_train_step: {_machine(device)}, torch {torch.__version__}, "
        f"{args.size}x{args.size}, batch {args.batch} (D_tr {math.ceil(args.batch / 2)}, "
        f"D_val {args.batch // 2}), K {args.inner_steps}, profile {args.profile}\n"
        f"# projection: {args.warmup_epochs} warm-up + {args.rollout_epochs} rollout epochs x "
        f"{steps} steps (N = {args.train_slices:,} training slices assumed)\n"
    )
    print(
        "| variant | outer step (ms) | slices/s | warm-up step (ms) | peak GPU mem (GiB) "
        "| projected hours |"
    )
    print("|---|---|---|---|---|---|")
    for variant in variants:
        if variant in ("amp", "amp_cl") and device.type != "cuda":
            print(f"| {variant} | skipped: AMP is off on CPU in training | | | | |")
            continue
        try:
            trainer = build(args, variant, device)
            cl = variant == "amp_cl"
            half = math.ceil(args.batch / 2)
            tr = inputs(args, device, cl, half)
            val = inputs(args, device, cl, args.batch - half)
            whole = inputs(args, device, cl, args.batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            warm = args.warmup + (2 if variant == "compile" else 0)
            t_outer = statistics.median(
                timed(
                    lambda tr=tr, val=val, trainer=trainer: outer_step(
                        trainer, tr, val, args.inner_steps
                    ),
                    device,
                    args.repeats,
                    warm,
                )
            )
            t_warm = statistics.median(
                timed(
                    lambda whole=whole, trainer=trainer: warmup_step(trainer, whole),
                    device,
                    args.repeats,
                    warm,
                )
            )
            mem = (
                f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                if device.type == "cuda"
                else "-"
            )
            hours = args.warmup_epochs * steps * t_warm + args.rollout_epochs * steps * t_outer
            print(
                f"| {variant} | {1000 * t_outer:.1f} | {args.batch / t_outer:.1f} | "
                f"{1000 * t_warm:.1f} | {mem} | {hours / 3600:.1f} |"
            )
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            message = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            print(f"| {variant} | failed: {type(exc).__name__}: {message} | | | | |")
        finally:
            sys.stdout.flush()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
