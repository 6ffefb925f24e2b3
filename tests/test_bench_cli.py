"""``benchmarks/bench_cli.py``: the command line's answer times and imports, read correctly."""

from __future__ import annotations

import re

import pytest
from bench_scripts import load


def test_top_level_imports_are_read_from_importtime():
    bench = load("bench_cli")
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   _io",
        "import time:       200 |       1500 | numpy",
        "import time:       300 |     250000 |     torch._C",
        "import time:      1000 |    2000000 | torch",
        "import time:        50 |         50 | numpy.linalg",
    ])
    top = bench.top_imports(stderr)
    assert top == pytest.approx({"numpy": 0.00155, "torch": 2.0})


@pytest.mark.slow
def test_the_light_verbs_import_no_torch(phantom_dir, capsys):
    """One round of every command: the baseline that imports torch says so, and no fuse4seg
    verb it times does (issue 9, part 4); every command exits 0."""
    bench = load("bench_cli")
    assert bench.main(["--repeats", "1", "--data", str(phantom_dir)]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| `([^`]+)` \| [\d.]+ \| [\d.]+ \| (yes|no) \|", out, re.M))
    assert rows['python -c "import torch"'] == "yes", out
    verbs = {k: v for k, v in rows.items() if k.startswith("fuse4seg")}
    assert len(verbs) == 6 and set(verbs.values()) == {"no"}, out
    assert "verbs without torch: 6 of 6" in out
