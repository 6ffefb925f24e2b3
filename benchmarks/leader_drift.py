"""The leader's EMA against the live leader, run by run (chapter 4, "Which leader is this?").

    python benchmarks/leader_drift.py RUN_DIR [RUN_DIR ...]

For each run folder with a leader (say the folders of a ``learning_curves.py --workdir``), one
row: the seed, ``train.ema_warmup``, the EMA's updates, the weight θ̂ still gives the initial
leader, the mean absolute difference from x_avg of the x_f of the initial, the live and the EMA
leader on the run's glass-box slices, and the EMA's from the live leader's x_f
(:func:`fuse4seg.train.validation.leader_drift`). Folders without a leader are skipped. Not a
timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fuse4seg.config import load_config
from fuse4seg.train.validation import leader_drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    args = parser.parse_args()
    print("| run | seed | ema_warmup | updates | initial's weight in θ̂ | x_f − x_avg: initial "
          "| live | EMA | EMA − live |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for run in sorted(args.runs, key=lambda p: p.name):
        if not (run / "config.yaml").is_file():
            raise SystemExit(f"leader_drift.py: {run} is not a run folder (no config.yaml)")
        drift = leader_drift(run)
        if drift is None:
            continue
        t = load_config(run / "config.yaml").train
        rows = {r["leader"]: r for r in drift["rows"]}
        print(f"| `{run.name}` | {t.seed} | {t.ema_warmup} | {drift['updates']} "
              f"| {drift['initial_share']:.3f} | {rows['initial']['from_x_avg']:.4f} "
              f"| {rows['live']['from_x_avg']:.4f} | {rows['EMA']['from_x_avg']:.4f} "
              f"| {rows['EMA']['from_live']:.4f} |")


if __name__ == "__main__":
    main()
