"""Compare the metrics of run folders made by two versions of the code (a refactor check).

Usage::

    python benchmarks/compare_runs.py OLD_RUNS NEW_RUNS

For every run folder ``<method>-<profile>-<hash>`` (and fusion-only ``fusion-<kind>-...``) in
OLD_RUNS it finds the folder of the same method and profile in NEW_RUNS and compares their
``metrics.jsonl`` row by row, ignoring wall-clock fields (``elapsed_s``, ``seconds``) and the
validation input's label (``val.prior``, renamed once). It prints one line per run: ``identical``
or the first differing row. Exit status 1 when any run differs or has no counterpart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_IGNORED = ("elapsed_s", "seconds")


def _rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            for key in _IGNORED:
                row.pop(key, None)
            if isinstance(row.get("val"), dict):
                row["val"].pop("prior", None)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    bad = 0
    for old in sorted(p for p in args.old.iterdir() if (p / "metrics.jsonl").is_file()):
        prefix = old.name.rsplit("-", 1)[0]
        matches = [p for p in args.new.glob(f"{prefix}-*") if (p / "metrics.jsonl").is_file()]
        same = [p for p in matches if _rows(p) == _rows(old)]
        if same:
            print(f"{old.name}: identical to {same[0].name} ({len(_rows(old))} rows)")
            continue
        bad += 1
        if not matches:
            print(f"{old.name}: no run of {prefix} in {args.new}")
            continue
        a, b = _rows(old), _rows(matches[0])
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        print(f"{old.name}: differs from {matches[0].name} (rows {len(a)} vs {len(b)}, "
              f"first difference in row {first})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
