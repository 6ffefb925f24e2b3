"""Measurement behind ``train.warmup_minmax`` (chapter 4): why the validation Dice collapses in
the first rollout epoch of the book's CPU run.

    python benchmarks/probe_rollout.py [--data DIR] [--profile default]
        [--variant "train.warmup_minmax=false" --variant "train.warmup_minmax=true" ...]

Trains the ``fuse4seg`` method with the profile (default: the book's CPU profile), validating
after every epoch, once per ``--variant`` (comma-separated ``NAME=VALUE`` overrides, plus
``method=M`` for another method; default: the raw x_avg warm-up with m = 0.99 and m = 0.9, the
min-max warm-up, and the fixed-rule ``average`` method with the same schedule). During the rollout
each validation is done twice on the same follower: with the EMA leader θ̂_f (what inference
uses, Algorithm 1's output) and with the live leader θ_f (what the inner loop trains the
follower on, line 9). It prints the validation mean Dice (NCR, ED, ET) per epoch from the last
warm-up epoch on, the EMA's weight on the leader it started from (m^u after u leader
updates), and a summary: the warmed-up follower on the untrained leader's x_f, the lowest and
last validation Dice of the rollout, the follower's training losses, and how far x_f drifted
from minmax(x_avg).

Data: the phantom (12 cases, seed 0, written in a temporary folder) unless ``--data`` names a
BraTS-layout folder or a prepared cache. Not a timing benchmark: an experiment whose printed
numbers the docs quote.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fuse4seg.config import get_config, parse_overrides
from fuse4seg.train.runs import resolve_cache
from fuse4seg.train.trainer import Trainer

DEFAULT_VARIANTS = [
    "train.warmup_minmax=false",
    "train.warmup_minmax=false,train.ema_decay=0.9",
    "train.warmup_minmax=true",
    "method=average",
]


def run(cache: Path, config, method: str, out: Path) -> list[dict]:
    from fuse4seg.models.fusion import minmax_normalize
    from fuse4seg.train.validation import collate

    trainer = Trainer(config, method, cache, out, progress=False, device="cpu")
    probe = collate(trainer.val_set, trainer.val_items, trainer.device)
    x1, x2 = probe["x1"], probe["x2"]
    mm_avg = minmax_normalize(0.5 * (x1 + x2))
    rows = []

    def on_epoch(row):
        entry = {"epoch": row["epoch"], "stage": row["stage"], "ema": row["val"]["mean_dice"]}
        entry["prior"] = row["val"]["prior"]
        entry["L_lower"] = row["L_lower"]
        leader = trainer.engine.leader
        has_leader = leader is not None
        if row["stage"] == "warmup" and row["epoch"] == config.train.warmup_epochs and has_leader:
            # the warmed-up follower on the untrained leader's x_f, before any rollout step
            entry["fresh"] = trainer.validate("rollout")["mean_dice"]
        if row["stage"] == "rollout" and has_leader:
            entry["live"] = trainer.validate("rollout", ema=False)["mean_dice"]
            entry["init_weight"] = config.train.ema_decay ** leader.updates
            x_f = trainer.prior(x1, x2, "rollout", ema=False)
            entry["drift"] = float((x_f - mm_avg).abs().mean())
        rows.append(entry)

    trainer.fit(callback=on_epoch)
    return rows


def scale_stats(cache: Path) -> dict[str, tuple[int, str, str]]:
    """Per split: slice count, and median [min, max] of x_avg's peak and of 1 / (peak − min)."""
    import numpy as np

    from fuse4seg.data.slices import SliceDataset

    out = {}
    for split in ("train", "val"):
        data = SliceDataset(cache, split)
        peaks, factors = [], []
        for i in range(len(data)):
            item = data[i]
            x_avg = 0.5 * (item["x1"] + item["x2"]).numpy()
            peaks.append(float(x_avg.max()))
            factors.append(1.0 / max(float(x_avg.max() - x_avg.min()), 1e-5))

        def fmt(values):
            return f"{np.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

        out[split] = (len(data), fmt(peaks), fmt(factors))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="BraTS-layout folder or cache (default: phantom)")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--variant", action="append", help="NAME=VALUE[,NAME=VALUE...]")
    args = parser.parse_args()
    variants = args.variant or DEFAULT_VARIANTS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from fuse4seg.data.phantom import write_phantom_dataset

            data = tmp / "phantom"
            write_phantom_dataset(data, cases=12, seed=0, progress=False)
        stats = scale_stats(resolve_cache(data, get_config(args.profile), cache=tmp / "cache",
                                          progress=False))
        results = []
        for i, variant in enumerate(variants):
            overrides = parse_overrides([v for v in variant.split(",") if v.strip()])
            method = overrides.pop("method", "fuse4seg")
            config = get_config(args.profile, {**overrides, "train.val_every": 1})
            cache = resolve_cache(data, config, cache=tmp / "cache", progress=False,
                                  replace_other=True)  # a variant may change data.*
            results.append(run(cache, config, method, tmp / f"run-{i}"))
            print(f"variant {variant!r} done", flush=True)
    t = config.train
    print(
        f"\ndata: {args.data or 'phantom (12 cases, seed 0)'}; profile {args.profile}; "
        f"{t.warmup_epochs} warm-up + {t.rollout_epochs} rollout epochs of "
        f"{t.steps_per_epoch} outer steps, K {t.inner_steps}; CPU\n"
    )
    print("the scale of the warm-up prior: per-slice peak of x_avg = (x1 + x2)/2, and the "
          "brightening factor 1 / (peak − min) that minmax(x_avg) applies (median [min, max])\n")
    print("| split | slices | peak of x_avg | factor of minmax |")
    print("|---|---|---|---|")
    for split, (n, peak, factor) in stats.items():
        print(f"| {split} | {n} | {peak} | {factor} |")
    print()
    print("validation mean Dice (NCR, ED, ET); in the rollout: EMA leader / live leader / m^u, "
          "the EMA's weight on the initial leader after u leader updates\n")
    for i, variant in enumerate(variants):
        print(f"- variant {i + 1}: `{variant}`")
    print()
    names = [f"variant {i + 1}" for i in range(len(variants))]
    print("| epoch | stage | " + " | ".join(names) + " |")
    print("|" + "---|" * (2 + len(variants)))
    for i, row in enumerate(results[0]):
        if row["stage"] == "warmup" and row["epoch"] < t.warmup_epochs:
            continue
        cells = []
        for res in results:
            r = res[i]
            if "live" in r:
                cells.append(f"{r['ema']:.3f} / {r['live']:.3f} / {r['init_weight']:.2f}")
            else:
                cells.append(f"{r['ema']:.3f} ({r['prior']})")
        print(f"| {row['epoch']} | {row['stage']} | " + " | ".join(cells) + " |")

    def mean(values):
        return f"{sum(values) / len(values):.3f}" if values else "–"

    print("\nsummary: L_lower is the follower's training loss (on D_tr in the rollout), mean over "
          "the last 5 epochs of a stage; fresh x_f = the warmed-up follower validated on the "
          "untrained leader's x_f; drift = largest mean |x_f − minmax(x_avg)| on the "
          "validation slices during the rollout\n")
    print("| | " + " | ".join(names) + " |")
    print("|" + "---|" * (1 + len(variants)))
    summary: dict[str, list[str]] = {}
    for res in results:
        warm = [r for r in res if r["stage"] == "warmup"]
        roll = [r for r in res if r["stage"] == "rollout"]
        drift = [r["drift"] for r in roll if "drift" in r]
        cells = {
            "val. Dice, end of warm-up (warm-up prior)": f"{warm[-1]['ema']:.3f}",
            "val. Dice, end of warm-up (fresh x_f)": (
                f"{warm[-1]['fresh']:.3f}" if "fresh" in warm[-1] else "–"
            ),
            "val. Dice, lowest in the rollout": f"{min(r['ema'] for r in roll):.3f}",
            "val. Dice, end of rollout": f"{roll[-1]['ema']:.3f}",
            "L_lower, warm-up": mean([r["L_lower"] for r in warm][-5:]),
            "L_lower, rollout": mean([r["L_lower"] for r in roll][-5:]),
            "drift of x_f": f"{max(drift):.4f}" if drift else "–",
        }
        for label, cell in cells.items():
            summary.setdefault(label, []).append(cell)
    for label, cells in summary.items():
        print(f"| {label} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
