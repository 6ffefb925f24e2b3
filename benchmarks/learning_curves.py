"""Learning curves of the book's CPU profile over seeds: does training reach a plateau? (issue 10)

    python benchmarks/learning_curves.py [--data phantom|DIR] [--profile default]
        [--methods average fuse4seg] [--seeds 0 1 2] [--out benchmarks/learning_curves.json]
        [--set NAME=VALUE ...] [--workdir DIR] [--threads N]

Trains each method once per seed with the profile, validating after **every** epoch
(``train.val_every=1``; everything else as the profile says), and writes per epoch the stage,
the follower's training loss L_lower and the validation mean Dice over NCR, ED and ET, plus the
time of each run (its own clock: training plus the validation of every epoch, so more than the
profile's run, which validates every 5th), the machine and the commit, to a JSON file that
chapter 4 plots. With ``--workdir`` the runs persist and are reused: two calls side by side
(``--methods average --threads 1`` and ``--methods fuse4seg --threads 1``) share the two cores,
and a last call with every method gathers the finished runs into one report.

Printed (:func:`fuse4seg.curves.summary_markdown`): per method, the validation mean Dice at the
end of each quarter of training (mean ± sd over seeds), the plateau test of issue 10 (the change
of the validation Dice over the last quarter of the epochs, mean over seeds, against the
seed-to-seed sd at the end; a change within the sd is a plateau) and the stage-change targets
(:mod:`fuse4seg.curves`). Chapter 4 plots the JSON (:func:`fuse4seg.curves.plot_learning_curves`).

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
from pathlib import Path

from fuse4seg.config import get_config, parse_overrides
from fuse4seg.curves import curve, plateau, rollout_targets, summary_markdown
from fuse4seg.train.runs import cpu_name, flatten


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="phantom")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--methods", nargs="+", default=["average", "fuse4seg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE overrides")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/learning_curves.json"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the phantom and the run folders here (default: a temporary "
                             "folder); finished runs in it are reused, so several calls (one "
                             "per method, say) can share the work and a last call gathers all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    import torch

    from fuse4seg.book import data_label, phantom_cases, prepare_phantom
    from fuse4seg.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {**parse_overrides(args.set), "train.val_every": 1}
    from fuse4seg.utils import code_digest

    # "code": the package's digest, so a reader can tell curves of other code (chapter 4)
    report = {"profile": args.profile, "overrides": args.set, "commit": commit(),
              "code": code_digest(),
              "cpu": cpu_name(), "cores": os.cpu_count(), "methods": {},
              # the settings every run shares (chapter 4 checks them: curves.config_differences)
              "config": flatten(get_config(args.profile, parse_overrides(args.set)))}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data = args.data
        if data == "phantom":
            data = work / "phantom"
            prepare_phantom(data, phantom_cases(args.profile))
        report["data"] = data_label(data)
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                cfg = get_config(args.profile, {**overrides, "train.seed": seed})
                load0 = os.getloadavg()[0]
                result = train(cfg, method, data=data, out=work / "runs", progress=False,
                               device="cpu", resume=True, restart_if_code_changed=True)
                info = json.loads((result.run_dir / "run.json").read_text())
                c = curve(result.run_dir)
                # the run's own clock (training and the validation of every epoch), so a
                # reused run reports the time it took when it was trained
                runs.append({"seed": seed, "seconds": c[-1]["elapsed_s"],
                             "threads": info.get("threads"), "load_before": load0,
                             "load_after": os.getloadavg()[0], "run": result.run_dir.name,
                             "curve": c})
                print(f"{method} seed {seed}: {c[-1]['elapsed_s']:.0f} s, final val "
                      f"{c[-1]['val']:.3f}", flush=True)
            curves = [r["curve"] for r in runs]
            report["methods"][method] = {"runs": runs, "plateau": plateau(curves),
                                         "rollout": rollout_targets(curves)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    tmp_out.replace(args.out)

    print(f"\n{report['data']}; profile {args.profile} {args.set}; seeds {args.seeds}; "
          f"commit {report['commit']}; {report['cpu']}, {report['cores']} cores\n")
    print(summary_markdown(report))


if __name__ == "__main__":
    main()
