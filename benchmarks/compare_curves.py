"""How far two ``learning_curves.py`` files differ: field by field, leaving out the clocks.

    python benchmarks/compare_curves.py OLD.json NEW.json

Compares every value of every epoch row of every run (method, seed) that both files hold:
the epoch, the stage, L_lower, the validation Dice and whatever else a row records, except
``elapsed_s`` (a clock). Prints how many fields were compared, how many differ, the largest
absolute difference of the numeric ones, and each run's last validation Dice in both files.
Exit status 0 either way; 2 when the files hold different methods, seeds or epochs (then
nothing is compared). A regeneration of the curves after a change that moves no computation
should give 0 differing fields on the same CPU model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fuse4seg.curves import load_report

CLOCKS = ("elapsed_s",)


def rows(report: dict) -> dict[tuple, dict]:
    """``(method, seed, epoch) -> row`` of a learning-curves report."""
    out = {}
    for method, entry in report["methods"].items():
        for run in entry["runs"]:
            for row in run["curve"]:
                out[(method, run["seed"], row["epoch"])] = row
    return out


def compare(old: dict, new: dict) -> dict:
    """Counts of compared and differing fields, the largest numeric difference, and the
    last validation Dice of each run in both reports.

    Raises:
        ValueError: the reports hold different (method, seed, epoch) rows.
    """
    a, b = rows(old), rows(new)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"the files hold different runs or epochs (e.g. {only})")
    compared = differ = 0
    largest = 0.0
    for key in sorted(a):
        for field in sorted(set(a[key]) | set(b[key])):
            if field in CLOCKS:
                continue
            compared += 1
            x, y = a[key].get(field), b[key].get(field)
            if x == y or (isinstance(x, float) and isinstance(y, float)
                          and math.isnan(x) and math.isnan(y)):
                continue
            differ += 1
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                largest = max(largest, abs(float(x) - float(y)))
    last = {}
    for (method, seed, epoch) in sorted(a):
        last[(method, seed)] = (a[(method, seed, epoch)].get("val"),
                                b[(method, seed, epoch)].get("val"))
    return {"compared": compared, "differ": differ, "largest": largest, "last_val": last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    try:
        reports = [load_report(p) for p in (args.old, args.new)]
        result = compare(*reports)
    except (OSError, ValueError) as exc:
        print(f"compare_curves: {exc}", file=sys.stderr)
        return 2
    for path, report in zip((args.old, args.new), reports, strict=True):
        print(f"{path}: commit {report.get('commit')}, code {report.get('code')}, "
              f"CPU {report.get('cpu')}")
    print(f"{result['differ']} of {result['compared']} fields differ (elapsed_s left out); "
          f"largest numeric difference {result['largest']:.3g}")
    for (method, seed), (x, y) in result["last_val"].items():
        print(f"  {method} seed {seed}: last validation Dice {x:.4f} -> {y:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
