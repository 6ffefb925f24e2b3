"""The README's module table matches the package tree (every module listed, nothing stale)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_lists_every_module_of_the_package():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(fuse4seg/[\w/]+\.py)`", section))
    present = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "fuse4seg").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert sorted(present - listed) == [], "modules missing from the README's table"
    assert sorted(listed - present) == [], "README lists modules that do not exist"


def test_no_package_file_is_over_about_700_lines():
    """One concept per module: a file past ~700 lines is doing two jobs (issue 8's bound)."""
    long = {
        p.relative_to(REPO).as_posix(): n
        for p in (REPO / "fuse4seg").rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 720
    }
    assert long == {}
