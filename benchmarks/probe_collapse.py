"""Which candidate causes the validation collapse at the start of the rollout (issue 10, part 1).

    python benchmarks/probe_collapse.py [--data phantom|DIR ...] [--seeds 0 1 2]
        [--profile default] [--epochs 3] [--candidates NAME ...] [--json OUT]

For each data set and seed, the ``fuse4seg`` follower is warmed up once (the profile's E_warm
epochs on the warm-up prior); its state (networks, AdamW moments, EMA, update counts) is then
copied, and each *candidate* restarts from that copy and runs the first ``--epochs`` rollout
epochs of Algorithm 1, validating after each. A candidate changes one thing at a time:

- ``as_is``: Algorithm 1 as the profile configures it (the control);
- ``scale``: the follower sees x_f mapped back to x_avg's intensity range,
  ``x_f · (max − min)(x_avg) + min(x_avg)`` per image: the warm-up prior's scale against
  min-max x_f, and nothing else;
- ``lr_paper``: the follower's rollout learning rate ×0.1 (``train.lr_follower_rollout``; the
  paper's 3e-4 where the default profile warms up at 3e-3);
- ``k1``: K = 1 instead of K follower steps on the same half batch (the same number of
  follower updates per epoch is *not* kept: this isolates the repetition);
- ``fresh_adam``: the follower's AdamW moments reset at the stage change;
- ``frozen_leader``: no leader step (x_f stays the untrained leader's, ≈ minmax(x_avg)): the
  leader's first updates;
- ``warm_minmax``: warm up on minmax(x_avg) (``train.warmup_minmax``; a warm-up of its own);
- ``warm_jitter``: warm up (and roll out) with the follower augmentation of ``train.augment``
  (brightness ×0.75–1.33 among others; a warm-up of its own);
- ``jitter_scale``: ``warm_jitter`` and ``scale`` together.

Printed per candidate, as mean ± sd over seeds: the follower's training loss L_lower in the
first rollout epoch over its last warm-up epoch (target ≤ 1.15), the validation mean Dice at
the end of the warm-up (on the warm-up prior), on the fresh x_f before any rollout step, the
lowest over the probed rollout epochs, and the drop (end of warm-up − lowest; target: within
the seed-to-seed sd of the end-of-warm-up Dice).

Data: ``phantom`` (the book's default phantom, written in a temporary folder) and/or folders of
NIfTI cases (e.g. the six visible real cases, linked into one folder), with
``data.split_fractions`` chosen so that every data set has validation patients. Not a timing:
an experiment whose printed numbers ``benchmarks/RESULTS.md`` and chapter 4 quote.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fuse4seg.config import get_config, parse_overrides
from fuse4seg.train.runs import resolve_cache

CANDIDATES = ["as_is", "scale", "lr_paper", "k1", "fresh_adam", "frozen_leader",
              "warm_minmax", "warm_jitter", "jitter_scale"]
WARMUPS = {"warm_minmax": {"train.warmup_minmax": True}, "warm_jitter": {"train.augment": True},
           "jitter_scale": {"train.augment": True}}
WARMUP_KEY = {"warm_minmax": "minmax", "warm_jitter": "jitter", "jitter_scale": "jitter"}


def _val(engine, val_set, items, stage, ema=True) -> float:
    from fuse4seg.train.validation import validate

    return float(validate(engine, val_set, items, stage, 16, ema)["mean_dice"])


def warm_up(config, cache: Path):
    """A fresh engine after the warm-up epochs; returns (engine, batches, val_set, items, row)."""
    from fuse4seg.data.slices import SliceDataset
    from fuse4seg.train.bilevel import Engine, steps_per_epoch
    from fuse4seg.train.trainer import SliceBatches

    device = torch.device("cpu")
    train_set, val_set = SliceDataset(cache, "train"), SliceDataset(cache, "val")
    n_val, cap = len(val_set), config.train.val_max_slices
    items = (np.arange(n_val) if cap is None or cap >= n_val
             else np.unique(np.linspace(0, n_val - 1, cap).round().astype(np.int64)))
    S = steps_per_epoch(config, len(train_set))
    batches = SliceBatches(train_set, config, 0, 1, S, device)
    engine = Engine(config, "fuse4seg", device, S)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(1, config.train.warmup_epochs + 1):
        losses = [engine.outer_step("warmup", epoch, s, batches)["L_lower"] for s in range(S)]
        if epoch % 10 == 0:
            print(f"  warm-up epoch {epoch}: L_lower {np.mean(losses):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    row = {
        "L_warm": float(np.mean(losses)),
        "val_warm": _val(engine, val_set, items, "warmup"),
        "val_fresh": _val(engine, val_set, items, "rollout"),
    }
    return engine, batches, val_set, items, row


def rollout(engine, batches, val_set, items, config, candidate: str, epochs: int) -> dict:
    """The first ``epochs`` rollout epochs under ``candidate``; per-epoch L_lower and val Dice."""
    from fuse4seg.models import minmax_normalize

    E = config.train.warmup_epochs
    S = engine.steps_per_epoch
    restore = []
    rollout_lr = config.train.lr_follower_rollout
    if candidate in ("scale", "jitter_scale"):
        prior = engine.prior

        def scaled(x1, x2, stage, ema):
            x = prior(x1, x2, stage, ema)
            if stage != "rollout":
                return x
            avg = 0.5 * (x1 + x2)
            lo = avg.amin(dim=(1, 2, 3), keepdim=True)
            hi = avg.amax(dim=(1, 2, 3), keepdim=True)
            return minmax_normalize(x) * (hi - lo) + lo

        engine.prior = scaled
        restore.append(lambda: delattr(engine, "prior"))
    if candidate == "lr_paper":  # a 10x smaller base of the follower's rollout schedule
        base = config.train.lr_follower_rollout or config.train.lr_follower
        object.__setattr__(config.train, "lr_follower_rollout", 0.1 * base)
    if candidate == "fresh_adam":
        engine.follower.opt.state.clear()
    if candidate == "frozen_leader":
        engine.leader_step = lambda *a, **k: {}
        restore.append(lambda: delattr(engine, "leader_step"))
    k_saved = config.train.inner_steps
    if candidate == "k1":
        object.__setattr__(config.train, "inner_steps", 1)
    out = {"L_roll": [], "val_roll": []}
    try:
        for epoch in range(E + 1, E + epochs + 1):
            losses = [engine.outer_step("rollout", epoch, s, batches)["L_lower"]
                      for s in range(S)]
            out["L_roll"].append(float(np.mean(losses)))
            out["val_roll"].append(_val(engine, val_set, items, "rollout"))
    finally:
        object.__setattr__(config.train, "inner_steps", k_saved)
        object.__setattr__(config.train, "lr_follower_rollout", rollout_lr)
        for undo in restore:
            undo()
    return out


def probe(data_name: str, cache_of, profile: str, base: dict, seeds, candidates, epochs):
    results = {c: [] for c in candidates}
    for seed in seeds:
        warm_states = {}
        for cand in candidates:
            key = WARMUP_KEY.get(cand, "raw")
            extra = WARMUPS.get(cand, {})
            config = get_config(profile, {**base, **extra, "train.seed": seed})
            cache = cache_of(config)
            if key not in warm_states:
                t0 = time.perf_counter()
                engine, batches, val_set, items, row = warm_up(config, cache)
                warm_states[key] = (engine, batches, val_set, items, row,
                                    copy.deepcopy(engine.state_dict()), config)
                print(f"[{data_name} seed {seed}] warm-up {key}: {row} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            engine, batches, val_set, items, row, state, config = warm_states[key]
            engine.load_state_dict(copy.deepcopy(state))
            res = rollout(engine, batches, val_set, items, config, cand, epochs)
            res.update(row)
            res["seed"] = seed
            results[cand].append(res)
            print(f"[{data_name} seed {seed}] {cand}: L {res['L_roll'][0]:.3f} "
                  f"(warm {row['L_warm']:.3f}), val {[round(v, 3) for v in res['val_roll']]} "
                  f"(warm {row['val_warm']:.3f}, fresh {row['val_fresh']:.3f})", flush=True)
    return results


def summarise(name: str, results: dict) -> list[str]:
    def ms(values):
        values = np.asarray(values, dtype=float)
        sd = values.std(ddof=1) if values.size > 1 else 0.0
        return f"{values.mean():.3f} ± {sd:.3f}"

    lines = [
        f"\n{name}: mean ± sd over seeds\n",
        "| candidate (seeds) | L_lower roll/warm | val. end of warm-up | val. fresh x_f | "
        "val. lowest in rollout | drop | val. last probed |",
        "|---|---|---|---|---|---|---|",
    ]
    for cand, runs in results.items():
        if not runs:
            continue
        ratio = [r["L_roll"][0] / r["L_warm"] for r in runs]
        lowest = [min(r["val_roll"]) for r in runs]
        drop = [r["val_warm"] - min(r["val_roll"]) for r in runs]
        lines.append(
            f"| {cand} ({len(runs)}) | {ms(ratio)} | {ms([r['val_warm'] for r in runs])} | "
            f"{ms([r['val_fresh'] for r in runs])} | {ms(lowest)} | {ms(drop)} | "
            f"{ms([r['val_roll'][-1] for r in runs])} |"
        )
    return lines


LINE = re.compile(r"^\[(?P<data>.+) seed (?P<seed>\d+)\] (?P<cand>\w+): L (?P<L>[\d.]+) "
                  r"\(warm (?P<Lw>[\d.]+)\), val \[(?P<vals>[^\]]*)\] \(warm (?P<vw>[\d.]+), "
                  r"fresh (?P<vf>[\d.]+)\)")


def from_logs(paths: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """The per-candidate results printed by earlier runs (``--summarise LOG ...``): the printed
    lines carry every number the summary needs, so runs split over seeds can be pooled."""
    out: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = LINE.match(line)
            if not m:
                continue
            entry = {"seed": int(m["seed"]), "L_roll": [float(m["L"])], "L_warm": float(m["Lw"]),
                     "val_roll": [float(v) for v in m["vals"].split(",")],
                     "val_warm": float(m["vw"]), "val_fresh": float(m["vf"])}
            out.setdefault(m["data"], {}).setdefault(m["cand"], []).append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["phantom"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="rollout epochs probed")
    parser.add_argument("--candidates", nargs="+", default=None)
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE overrides")
    parser.add_argument("--phantom-cases", type=int, default=None)
    parser.add_argument("--phantom-dir", type=Path, default=None,
                        help="keep the phantom here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--summarise", nargs="+", type=Path, default=None,
                        help="print the summary of earlier runs' logs instead of training")
    args = parser.parse_args()
    if args.summarise:
        for name, results in from_logs(args.summarise).items():
            print("\n".join(summarise(name, results)))
        return
    base = parse_overrides(args.set)
    candidates = args.candidates or CANDIDATES
    if args.threads:
        torch.set_num_threads(args.threads)
    lines, everything = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for data in args.data:
            if data == "phantom":
                from fuse4seg.book import phantom_cases, prepare_phantom

                n = args.phantom_cases or phantom_cases(args.profile)
                folder = args.phantom_dir or tmp / "phantom"
                prepare_phantom(folder, n)
                name = f"phantom ({n} cases)"
            else:
                folder, name = Path(data), data

            def cache_of(config, folder=folder):
                return resolve_cache(folder, config, cache=tmp / f"cache-{abs(hash(folder))}",
                                     progress=False, replace_other=True)  # data.* candidates

            results = probe(name, cache_of, args.profile, base, args.seeds, candidates,
                            args.epochs)
            everything[name] = results
            lines += summarise(name, results)
            print("\n".join(summarise(name, results)), flush=True)
    t = get_config(args.profile, base).train
    print(f"\nprofile {args.profile} {args.set}: {t.warmup_epochs} warm-up epochs of "
          f"{t.steps_per_epoch} steps, then {args.epochs} rollout epochs, K {t.inner_steps}; "
          f"seeds {args.seeds}; CPU, {torch.get_num_threads()} threads")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
