"""Two real-data studies of one method under two configurations, compared case by case.

    python benchmarks/compare_studies.py RUNS_A RUNS_B --methods average fuse4seg \
        [--names "64x64" "80x80"]

``RUNS_A`` and ``RUNS_B`` are ``--runs`` folders of ``benchmarks/study_real.py`` made with the
same cases, folds and seeds but another configuration (e.g. ``--set data.crop_size=80``). Each
run's stored test scores (``test.json``, written by :func:`fuse4seg.study.evaluate_cached`) are
read (mean Dice over NCR, ED and ET per case, :func:`fuse4seg.study.case_scores`, as
``study_real.py`` tabulates it); nothing is trained or scored. For every method the script
prints the mean test Dice per study and the paired difference A − B over (seed, test case)
with a bootstrap 95 % interval (:func:`fuse4seg.study.paired_difference`). A run is matched
to its seed by ``train.seed`` in its ``config.yaml``; a method, fold or seed missing from
either study is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from fuse4seg.formatting import format_signed
from fuse4seg.study import case_scores, paired_difference


def scores(runs: Path, method: str) -> dict[int, dict[str, float]]:
    """``{seed: {case: mean Dice}}`` of ``method`` over every fold of a study folder."""
    out: dict[int, dict[str, float]] = {}
    folds = sorted(p for p in runs.glob("fold*/runs") if p.is_dir())
    if not folds:
        raise SystemExit(f"{runs}: no fold*/runs folders (a study_real.py --runs folder?)")
    for fold in folds:
        found = sorted(fold.glob(f"{method}-*"))
        if not found:
            raise SystemExit(f"{fold}: no run of {method}")
        for run in found:
            test = run / "test.json"
            if not test.is_file():
                raise SystemExit(f"{run}: no test.json (the run was not scored)")
            seed = int(yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"])
            per_case = case_scores(json.loads(test.read_text())["result"])
            out.setdefault(seed, {}).update(per_case)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_a", type=Path)
    parser.add_argument("runs_b", type=Path)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    args = parser.parse_args(argv)
    a_name, b_name = args.names
    print(f"| method | {a_name} | {b_name} | {a_name} − {b_name} | 95 % interval | cases × seeds |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        a, b = scores(args.runs_a, method), scores(args.runs_b, method)
        if sorted(a) != sorted(b) or any(sorted(a[s]) != sorted(b[s]) for s in a):
            raise SystemExit(f"{method}: the two studies hold different seeds or cases")
        d = paired_difference(a, b, names=(a_name, b_name))

        def mean(x):
            return np.mean([np.mean(list(v.values())) for v in x.values()])

        print(f"| `{method}` | {mean(a):.3f} | {mean(b):.3f} | {format_signed(d['mean'])} | "
              f"[{format_signed(d['low'])}, {format_signed(d['high'])}] | "
              f"{d['n_cases']} × {d['n_seeds']} |")


if __name__ == "__main__":
    main()
