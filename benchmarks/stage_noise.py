"""The stage change on real folds against the noise of one validation patient.

    python benchmarks/stage_noise.py RUNS --methods average fuse4seg [--window 5] [--cadence 5]

``RUNS`` is a ``--runs`` folder of ``benchmarks/study_real.py`` trained with
``--set train.val_every=1`` (every epoch validated on the fold's one validation case). Nothing
is trained. For every fold, method and seed the script prints what
:func:`fuse4seg.curves.warmup_noise` measures: the last warm-up validation (the value issue
10's drop target starts from), the warm-up's level and epoch-to-epoch sd over its last
``--window`` epochs, the lowest rollout validation a run validated every ``--cadence`` epochs
would see (the ``default`` profile validates every 5), the drop from each, and whether the
drop from the level lies within the warm-up's epoch-to-epoch sd. Validating
every epoch changes no weight (validation draws no random number and updates nothing), so the
values at the cadence's epochs are those of an ordinary run. A run is matched to its seed by
``train.seed`` in its ``config.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from fuse4seg.curves import curve, warmup_noise


def rows(runs: Path, method: str, window: int, cadence: int) -> list[str]:
    out = []
    folds = sorted(p for p in runs.glob("fold*/runs") if p.is_dir())
    if not folds:
        raise SystemExit(f"{runs}: no fold*/runs folders (a study_real.py --runs folder?)")
    for fold in folds:
        found = sorted(r for r in fold.glob(f"{method}-*") if (r / "metrics.jsonl").exists())
        if not found:
            raise SystemExit(f"{fold}: no run of {method}")
        seeds = [yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"]
                 for r in found]
        order = np.argsort(seeds)
        t = warmup_noise([curve(found[i]) for i in order], window=window, cadence=cadence)
        if t is None:
            raise SystemExit(f"{fold}: {method} has no warm-up and rollout")

        def cells(key, t=t):
            values = [round(v, 3) + 0.0 for v in t[key]]  # + 0.0: no "-0.000"
            return ", ".join(f"{v:+.3f}" if key.startswith("drop") else f"{v:.3f}"
                             for v in values)

        out.append(f"| {fold.parent.name} | `{method}` | {', '.join(str(seeds[i]) for i in order)}"
                   f" | {cells('last')} | {cells('level')} | {cells('epoch_sd')} | "
                   f"{cells('rollout_min')} | {cells('drop_last')} | {cells('drop_level')} | "
                   f"{', '.join('yes' if w else 'no' for w in t['within_noise'])} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--methods", nargs="+", default=["average", "fuse4seg"])
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--cadence", type=int, default=5)
    args = parser.parse_args()
    print(f"| fold | method | seeds | last warm-up val | level (last {args.window}) | "
          f"epoch sd (last {args.window}) | lowest rollout val (every {args.cadence}) | "
          "drop from last | drop from level | drop from level ≤ epoch sd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        print("\n".join(rows(args.runs, m, args.window, args.cadence)))


if __name__ == "__main__":
    main()
