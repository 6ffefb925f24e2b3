"""Learning curves of the book's CPU profile over seeds: does training reach a plateau? (issue 10)

    python benchmarks/learning_curves.py [--data phantom|DIR] [--profile default]
        [--methods average fuse4seg] [--seeds 0 1 2] [--out benchmarks/learning_curves.json]
        [--set NAME=VALUE ...]

Trains each method once per seed with the profile, validating after **every** epoch
(``train.val_every=1``; everything else as the profile says), and writes per epoch the stage,
the follower's training loss L_lower and the validation mean Dice over NCR, ED and ET, plus the
wall time of each run, the machine and the commit, to a JSON file that chapter 4 plots.

Printed: per method, the validation mean Dice at the end of each quarter of training (mean ±
sd over seeds), and the plateau test of issue 10: the change of the validation Dice over the
last quarter of the epochs (mean over seeds), against the seed-to-seed sd at the end. A change
within the sd is a plateau.

Data: the book's phantom for the profile (written in a temporary folder) unless ``--data``
names a NIfTI folder or a prepared cache. Not a timing benchmark, but the per-run times it
records are real (say the load when quoting them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from fuse4seg.config import get_config, parse_overrides
from fuse4seg.train.runs import cpu_name


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [
        {"epoch": r["epoch"], "stage": r["stage"], "L_lower": r.get("L_lower"),
         "val": r["val"]["mean_dice"] if "val" in r else None, "elapsed_s": r.get("elapsed_s")}
        for r in rows
    ]


def plateau(curves: list[list[dict]]) -> dict:
    """The change of val. Dice over the last quarter of epochs against the seed-to-seed sd."""
    vals = np.array([[r["val"] for r in c] for c in curves], dtype=float)  # seeds x epochs
    n = vals.shape[1]
    start = n - max(1, n // 4) - 1  # the epoch a quarter of the run before the end
    change = vals[:, -1] - vals[:, start]
    sd = float(vals[:, -1].std(ddof=1)) if len(curves) > 1 else float("nan")
    return {"from_epoch": start + 1, "to_epoch": n, "change_mean": float(change.mean()),
            "change_per_seed": change.tolist(), "sd_end": sd,
            "plateau": bool(abs(change.mean()) <= sd) if len(curves) > 1 else None}


def rollout_targets(curves: list[list[dict]]) -> dict | None:
    """Issue 10's targets at the stage change: L_lower(first rollout epoch) / L_lower(last
    warm-up epoch) ≤ 1.15, and no rollout validation below the last warm-up validation by more
    than the seed-to-seed sd (of the last warm-up validation)."""
    ratios, drops, warm_vals = [], [], []
    for c in curves:
        warm = [r for r in c if r["stage"] == "warmup"]
        roll = [r for r in c if r["stage"] == "rollout"]
        if not warm or not roll:
            return None
        ratios.append(roll[0]["L_lower"] / warm[-1]["L_lower"])
        warm_vals.append(warm[-1]["val"])
        drops.append(warm[-1]["val"] - min(r["val"] for r in roll))
    sd = float(np.std(warm_vals, ddof=1)) if len(curves) > 1 else float("nan")
    return {"loss_ratio": ratios, "drop": drops, "sd_warm": sd,
            "loss_ok": bool(max(ratios) <= 1.15), "drop_ok": bool(max(drops) <= sd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="phantom")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--methods", nargs="+", default=["average", "fuse4seg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/learning_curves.json"))
    args = parser.parse_args()
    from fuse4seg.book import data_label, phantom_cases, prepare_phantom
    from fuse4seg.train.trainer import train

    overrides = {**parse_overrides(args.set), "train.val_every": 1}
    report = {"profile": args.profile, "overrides": args.set, "commit": commit(),
              "cpu": cpu_name(), "cores": os.cpu_count(), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data == "phantom":
            data = tmp / "phantom"
            prepare_phantom(data, phantom_cases(args.profile))
        report["data"] = data_label(data)
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                cfg = get_config(args.profile, {**overrides, "train.seed": seed})
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = train(cfg, method, data=data, out=tmp / "runs", progress=False,
                               device="cpu")
                seconds = time.perf_counter() - t0
                runs.append({"seed": seed, "seconds": round(seconds, 1), "load_before": load0,
                             "load_after": os.getloadavg()[0], "curve": curve(result.run_dir)})
                print(f"{method} seed {seed}: {seconds:.0f} s, final val "
                      f"{runs[-1]['curve'][-1]['val']:.3f}", flush=True)
            curves = [r["curve"] for r in runs]
            report["methods"][method] = {"runs": runs, "plateau": plateau(curves),
                                         "rollout": rollout_targets(curves)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    tmp_out.replace(args.out)

    print(f"\n{report['data']}; profile {args.profile} {args.set}; seeds {args.seeds}; "
          f"commit {report['commit']}; {report['cpu']}, {report['cores']} cores\n")
    for method, entry in report["methods"].items():
        t = entry["rollout"]
        if t:
            print(f"{method}: L_lower first rollout / last warm-up epoch per seed "
                  f"{[round(r, 3) for r in t['loss_ratio']]} (target ≤ 1.15: "
                  f"{'met' if t['loss_ok'] else 'not met'}); val. drop from the last warm-up "
                  f"to the lowest rollout epoch {[round(d, 3) for d in t['drop']]} against the "
                  f"seed sd {t['sd_warm']:.3f} ({'met' if t['drop_ok'] else 'not met'})")
    print()
    print("| method | s per run | val. Dice at 1/4 | 1/2 | 3/4 | end | change over last 1/4 "
          "| sd at end | plateau |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, entry in report["methods"].items():
        vals = np.array([[r["val"] for r in run["curve"]] for run in entry["runs"]])
        n = vals.shape[1]
        cells = []
        for q in (n // 4, n // 2, 3 * n // 4, n):
            col = vals[:, q - 1]
            cells.append(f"{col.mean():.3f} ± {col.std(ddof=1) if len(col) > 1 else 0:.3f}")
        p = entry["plateau"]
        secs = np.mean([r["seconds"] for r in entry["runs"]])
        print(f"| {method} | {secs:.0f} | " + " | ".join(cells)
              + f" | {p['change_mean']:+.3f} (epochs {p['from_epoch']}→{p['to_epoch']}) "
              f"| {p['sd_end']:.3f} | {'yes' if p['plateau'] else 'no'} |")


if __name__ == "__main__":
    main()
