"""``benchmarks/measured.json`` holds figures copied from ``benchmarks/RESULTS.md`` (chapter 7
computes its projections from them): every copied value must be on the RESULTS.md line named as
its source, so the two files cannot drift apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# value key -> the key of the RESULTS.md line it is copied from
VALUE_SOURCES = {
    "fwd_ms": "source",
    "fwd_bwd_ms": "source",
    "peak_mib": "source",
    "estimate_ms": "source",
    "outer_step_s": "source",
    "warmup_step_s": "source",
    "slices_kept": "source",
    "prepare_s_per_case": "source",
    "check_s_per_case": "check_source",
    "leader_fp32_peak_gb": "leader_fp32_source",
    "outer_step_ms": "source",
    "warmup_step_ms": "source",
    "compile_s": "source",
    "peak_gib": "peak_source",
    "lo_ms": "source",
    "hi_ms": "source",
}


def _numbers(line: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", line)]


def _entries(node, path="measured"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _entries(value, f"{path}.{key}")


def test_measured_values_are_copied_from_results():
    """Each value is on its source line, and in its place there: the values copied from one
    line follow each other there in the order of the entry's keys (a table row's columns), and
    a spread's ``lo_ms`` and ``hi_ms`` are the least and the greatest number of its row."""
    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    lines = set(results.splitlines())
    measured = json.loads((REPO / "benchmarks" / "measured.json").read_text(encoding="utf-8"))
    checked = 0
    for path, entry in _entries(measured):
        after: dict[str, int] = {}  # source key -> where on its line the next value may start
        for key, value in entry.items():
            if key.endswith("source"):
                assert value in lines, f"{path}.{key} is not a line of RESULTS.md: {value!r}"
            if key in VALUE_SOURCES and isinstance(value, (int, float)):
                numbers = _numbers(entry[VALUE_SOURCES[key]])
                if key in ("lo_ms", "hi_ms"):
                    which = "least" if key == "lo_ms" else "greatest"
                    assert float(value) == (min if key == "lo_ms" else max)(numbers), (
                        f"{path}.{key} = {value} is not the {which} number of "
                        f"{entry[VALUE_SOURCES[key]]!r}")
                else:
                    start = after.get(VALUE_SOURCES[key], 0)
                    assert float(value) in numbers[start:], (
                        f"{path}.{key} = {value} is not on its RESULTS.md line "
                        f"{entry[VALUE_SOURCES[key]]!r} after the values before it")
                    after[VALUE_SOURCES[key]] = numbers.index(float(value), start) + 1
                checked += 1
    assert checked >= 23


def test_chapter_7_projects_from_the_measured_gpu_step():
    """Once a GPU outer step is measured, chapter 7's GPU rows use it, not the estimate."""
    measured = json.loads((REPO / "benchmarks" / "measured.json").read_text(encoding="utf-8"))
    chapter = (REPO / "book" / "07_at_scale.md").read_text(encoding="utf-8")
    if measured["gpu_outer_step"]["measured"]:
        assert 'step["amp"]["outer_step_ms"]' in chapter
        assert "Not measured yet" not in chapter
    else:
        assert "Not measured yet" in chapter
