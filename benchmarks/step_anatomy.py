"""Where the time of CPU training goes (issue 9, part 1): the parts of one update, the cost per
op, and the trainer around the steps.

Three measurements, printed as Markdown tables:

1. **The parts of one follower update** (the warm-up step) at each ``--sizes``: forward,
   L_lower (with the finiteness guard), backward, gradient clipping (with the guard), AdamW,
   and the follower's weight average (``train.follower_ema``). These are the operations of
   :meth:`fuse4seg.train.bilevel.Engine.follower_step`, timed one by one (:func:`follower_parts`
   repeats that method's code, without its augmentation: change the two together); the last
   row times ``follower_step`` itself, as the trainer calls it, as a check of the sum.
2. **The cost that does not shrink with the image**: the outer and warm-up steps of
   ``bench_train_step.py`` at each size. The step at a tiny size is mostly per-op work
   (Python, dispatch, small kernels), which no faster kernel removes; what the step loses
   from the default size down to it is the work that scales with the pixels.
3. **The trainer around the steps** (with ``--data``, a raw phantom or BraTS folder, or a
   prepared cache): one ``fuse4seg`` training run of the profile (its epochs and validation
   cadence unless ``--warmup-epochs``, ``--rollout-epochs``, ``--val-every`` say otherwise),
   its wall time split into assembling batches (the slice cache's ``collate``), the steps
   without their batches, and the end of each epoch (validation, checkpoints, metrics). The
   cache is prepared before the clock starts.

Times are medians (parts 1 and 2) over ``--repeats`` calls, with the sizes in turns; part 3 is
one run. A measurement only: nothing here changes training.

Usage::

    python benchmarks/step_anatomy.py --profile default --sizes 16 64 --data _data/phantom
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from fuse4seg.config import get_config
from fuse4seg.train.bilevel import Engine

PARTS = ("forward", "L_lower", "backward", "clip + guard", "AdamW", "follower average")


def build_engine(profile: str, size: int, batch: int, inner: int) -> Engine:
    """A CPU ``Engine`` of ``profile`` at ``size``, batch ``batch`` and K ``inner`` (also
    ``probe_follower.py``'s)."""
    config = get_config(profile, {"data.crop_size": size, "train.batch_size": batch,
                                  "train.inner_steps": inner})
    return Engine(config, "fuse4seg", torch.device("cpu"), steps_per_epoch=10**6)


def random_batch(n: int, size: int, seed: int = 0):
    """``x1, x2`` ``(n, 1, size, size)`` in [0, 1) and labels ``(n, size, size)`` in 0-3, from
    ``seed`` (also ``probe_follower.py``'s)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, 1, size, size, generator=gen)
    x2 = torch.rand(n, 1, size, size, generator=gen)
    seg = torch.randint(0, 4, (n, size, size), generator=gen)
    return x1, x2, seg


def follower_parts(engine: Engine, x_in: torch.Tensor, seg: torch.Tensor) -> dict[str, float]:
    """One follower update, its parts timed apart (seconds): the operations of
    ``Engine.follower_step`` (and ``Learner.step``) in their order."""
    f = engine.follower
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    f.zero_grad()
    f.net.train()
    with engine.autocast():
        logits = f.net(x_in)
    t1 = time.perf_counter()
    loss = engine.lower_loss(logits, seg)
    t2 = time.perf_counter()
    f.scaler.scale(loss).backward()
    t3 = time.perf_counter()
    f.scaler.unscale_(f.opt)
    clip = f.grad_clip if f.grad_clip and f.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(f.net.parameters(), clip)
    engine.guard({"L_lower": loss, "gradient norm": norm})  # the step's one sync
    t4 = time.perf_counter()
    f.scaler.step(f.opt)
    f.scaler.update()
    f.updates += 1
    t5 = time.perf_counter()
    if engine.follower_ema is not None:
        engine.follower_ema.update(engine.follower_module)
    t6 = time.perf_counter()
    edges = (t0, t1, t2, t3, t4, t5, t6)
    for name, a, b in zip(PARTS, edges, edges[1:], strict=False):
        times[name] = b - a
    return times


def anatomy(args) -> None:
    """Parts 1 and 2: the follower update's parts and the whole steps at each size."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train_step as bts

    cases = {}
    for size in args.sizes:
        engine = build_engine(args.profile, size, args.batch, args.inner_steps)
        whole = random_batch(args.batch, size)
        half = math.ceil(args.batch / 2)
        tr, val = random_batch(half, size, 1), random_batch(args.batch - half, size, 2)
        x_avg = engine.prior(whole[0], whole[1], "warmup", ema=False)
        cases[size] = (engine, whole, tr, val, x_avg)
    parts: dict[int, dict[str, list[float]]] = {s: defaultdict(list) for s in args.sizes}
    for _ in range(args.warmup):
        for engine, whole, tr, val, x_avg in cases.values():
            follower_parts(engine, x_avg, whole[2])
            bts.outer_step(engine, tr, val, args.inner_steps)
    for r in range(args.repeats):
        for size in args.sizes if r % 2 == 0 else args.sizes[::-1]:
            engine, whole, tr, val, x_avg = cases[size]
            for name, t in follower_parts(engine, x_avg, whole[2]).items():
                parts[size][name].append(t)
            t0 = time.perf_counter()
            engine.follower_step(x_avg, whole[2])
            t1 = time.perf_counter()
            bts.warmup_step(engine, whole)
            t2 = time.perf_counter()
            bts.outer_step(engine, tr, val, args.inner_steps)
            t3 = time.perf_counter()
            parts[size]["follower_step (as trained)"].append(t1 - t0)
            parts[size]["warm-up step"].append(t2 - t1)
            parts[size]["outer step"].append(t3 - t2)

    def ms(size, name):
        return 1000 * statistics.median(parts[size][name])

    head = " | ".join(f"{s}×{s} (ms)" for s in args.sizes)
    print(f"\n## 1. One follower update, part by part (batch {args.batch}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats})\n")
    print(f"| part | {head} | share at {args.sizes[-1]}×{args.sizes[-1]} |")
    print("|---|" + "---:|" * (len(args.sizes) + 1))
    big = args.sizes[-1]
    total_big = sum(ms(big, p) for p in PARTS)
    for name in PARTS:
        cells = " | ".join(f"{ms(s, name):.1f}" for s in args.sizes)
        print(f"| {name} | {cells} | {100 * ms(big, name) / total_big:.0f} % |")
    cells = " | ".join(f"{sum(ms(s, p) for p in PARTS):.1f}" for s in args.sizes)
    print(f"| sum of the parts | {cells} | 100 % |")
    cells = " | ".join(f"{ms(s, 'follower_step (as trained)'):.1f}" for s in args.sizes)
    print(f"| `follower_step`, as trained | {cells} | |")

    small = args.sizes[0]
    print(f"\n## 2. Whole steps by size (K {args.inner_steps}; the smallest size keeps the "
          "per-op cost and little else)\n")
    print(f"| step | {head} | {small}×{small} / {big}×{big} |")
    print("|---|" + "---:|" * (len(args.sizes) + 1))
    for name in ("warm-up step", "outer step"):
        cells = " | ".join(f"{ms(s, name):.1f}" for s in args.sizes)
        print(f"| {name} | {cells} | {ms(small, name) / ms(big, name):.2f} |")


def trainer_split(args) -> dict:
    """Part 3: one training run, its wall time split into batches, steps and epoch ends.

    Returns ``{"seconds": {part: s}, "calls": {part: n}, "wall": s, "steps": n, "epochs": n}``
    (``steps`` and ``epochs`` from the run's metrics rows), and prints the table."""
    from fuse4seg.train.bilevel import Engine as EngineCls
    from fuse4seg.train.trainer import SliceBatches, Trainer, train

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    stack: list[str] = []  # the timed calls in progress

    def timed(cls, name, key):
        original = getattr(cls, name)

        def wrapper(self, *a, **k):
            # batches count only when a step fetches them (the end of the warm-up also draws
            # the first rollout epoch's D_tr halves: that is end-of-epoch time)
            counted = key != "batches" or stack[-1:] == ["steps"]
            stack.append(key)
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                stack.pop()
                if counted:
                    spent[key] += time.perf_counter() - start
                    calls[key] += 1

        setattr(cls, name, wrapper)
        return original

    saved = [
        (SliceBatches, "single", timed(SliceBatches, "single", "batches")),
        (SliceBatches, "split", timed(SliceBatches, "split", "batches")),
        (EngineCls, "outer_step", timed(EngineCls, "outer_step", "steps")),
        (Trainer, "_end_epoch", timed(Trainer, "_end_epoch", "end of epoch")),
    ]
    chosen = {"train.warmup_epochs": args.warmup_epochs,
              "train.rollout_epochs": args.rollout_epochs, "train.val_every": args.val_every}
    config = get_config(args.profile, {k: v for k, v in chosen.items() if v is not None})
    train_cfg = config.train
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = None if (Path(args.data) / "manifest.json").exists() else Path(tmp) / "cache"
            if cache is not None:  # prepare outside the timed run
                from fuse4seg.train import runs

                cache = runs.resolve_cache(args.data, config, cache=cache, runs_dir=Path(tmp),
                                           progress=False)
            start = time.perf_counter()
            result = train(config, "fuse4seg", data=cache or args.data, out=Path(tmp) / "runs",
                           progress=False)
            wall = time.perf_counter() - start
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
    steps = spent["steps"] - spent["batches"]  # outer_step fetches its own batches
    rows = [("assembling batches (collate)", spent["batches"]),
            ("the steps, without their batches", steps),
            ("end of epoch (validation, checkpoints, metrics)", spent["end of epoch"])]
    rest = wall - sum(seconds for _, seconds in rows)
    rows.append(("the rest (building the run: models, data sets, run folder)", rest))
    print(f"\n## 3. The trainer around the steps: `fuse4seg` on {args.data}, profile "
          f"{args.profile}, {train_cfg.warmup_epochs} warm-up + {train_cfg.rollout_epochs} "
          f"rollout epochs, validation every {train_cfg.val_every} epoch(s); "
          f"{len(result.metrics)} epochs run\n")
    print("| where | s | share |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {100 * seconds / wall:.1f} % |")
    print(f"| all (wall) | {wall:.2f} | 100 % |")
    return {"seconds": {**spent, "rest": rest}, "calls": dict(calls), "wall": wall,
            "steps": sum(int(r["steps"]) for r in result.metrics),
            "epochs": len(result.metrics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="model variants of this profile")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64],
                        help="slice sizes, smallest first (default 16 64)")
    parser.add_argument("--batch", type=int, default=8, help="batch size B")
    parser.add_argument("--inner-steps", type=int, default=3, help="K")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data", help="part 3: a raw phantom/BraTS folder or a prepared cache")
    parser.add_argument("--warmup-epochs", type=int, help="part 3 (default: the profile's)")
    parser.add_argument("--rollout-epochs", type=int, help="part 3 (default: the profile's)")
    parser.add_argument("--val-every", type=int, help="part 3 (default: the profile's)")
    args = parser.parse_args(argv)
    if sorted(args.sizes) != args.sizes or len(set(args.sizes)) != len(args.sizes):
        parser.error(f"--sizes must be distinct and increasing, got {args.sizes}")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# step_anatomy: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"profile {args.profile}", flush=True)
    anatomy(args)
    if args.data is not None:
        trainer_split(args)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
