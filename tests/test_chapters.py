"""Every chapter of the book (``book/*.md`` notebooks) follows the book's rules and runs.

The slow test executes each chapter through the same code path as ``make book``
(``book/build.py``: jupytext, then papermill with only the parameters the chapter declares) in
the ``smoke`` profile, on phantom data written once per session into a temporary folder (as
many cases as ``make book PROFILE=smoke`` writes). The Harvard and GFP folders of the shared
real data are passed when the conftest fixtures find them; ``brats_dir`` stays ``None``, as in
``make book`` without ``BRATS_DIR``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import load_book_build

REPO = Path(__file__).resolve().parents[1]


# Every test here that starts a Jupyter kernel runs on one xdist worker ("kernels" group, with
# `--dist loadgroup`): two kernels launched at once by two workers once left a chapter waiting
# forever for a reply (seen in `make test`), which a per-cell timeout now also bounds.
pytestmark = pytest.mark.xdist_group("kernels")

build = load_book_build()

CHAPTERS = [
    build.Chapter(f"book/{path.stem}", path, True)
    for path in sorted((REPO / "book").glob("*.md"))
    if build.is_notebook_markdown(path)
]
IDS = [chapter.docname for chapter in CHAPTERS]


def _code_cells(chapter):
    import jupytext

    return [cell for cell in jupytext.read(chapter.source).cells if cell.cell_type == "code"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_chapter_opens_with_plain_parameters_and_setup(chapter):
    cells = _code_cells(chapter)
    assert len(cells) >= 3, (
        f"{chapter.source}: expected a parameters cell, the parameter check and a setup cell"
    )
    first, check, setup = cells[0], cells[1], cells[2]
    assert "parameters" in first.metadata.get("tags", []), (
        f"{chapter.source}: the first code cell must be tagged `parameters`"
    )
    names = []
    for node in ast.parse(first.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, (
            f"{chapter.source}: the parameters cell holds plain assignments only"
        )
        assert isinstance(node.targets[0], ast.Name), f"{chapter.source}: assign plain names"
        try:
            ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(
                f"{chapter.source}: parameter {node.targets[0].id} is not a plain value "
                f"({ast.unparse(node.value)})"
            )
        names.append(node.targets[0].id)
    assert "profile" in names and "device" in names, (
        f"{chapter.source}: the parameters cell must declare `profile` and `device`"
    )
    # papermill only warns about `-p NAME` when NAME is not declared: cell 2 refuses it
    assert "check_parameters(globals())" in check.source, (
        f"{chapter.source}: cell 2 calls fuse4seg.book.check_parameters(globals())"
    )
    assert "remove-cell" in check.metadata.get("tags", []), (
        f"{chapter.source}: tag the parameter check `remove-cell` (readers need not see it)"
    )
    assert "get_config(" in setup.source, f"{chapter.source}: build the config in cell 3"
    assert "environment_summary(" in setup.source, (
        f"{chapter.source}: print fuse4seg.utils.environment_summary(device) in cell 3"
    )


# --------------------------------------------------------------------------------------------
# Execution (slow)
# --------------------------------------------------------------------------------------------


def _optional_dir(request, fixture: str) -> str | None:
    """The conftest fixture's folder, or ``None`` where the real data is absent."""
    try:
        path = Path(request.getfixturevalue(fixture))
    except pytest.skip.Exception:
        return None
    return str(path) if path.is_dir() else None


@pytest.fixture(scope="session")
def book_phantom(tmp_path_factory) -> Path:
    """The phantom ``make book PROFILE=smoke`` writes, made once per session."""
    try:
        import fuse4seg.data.phantom  # noqa: F401
    except ImportError as err:
        pytest.skip(f"fuse4seg.data.phantom is not available yet: {err}")
    out = tmp_path_factory.mktemp("book-data") / "phantom"
    build.prepare_phantom(out, cases=build.phantom_cases("smoke"))
    return out


@pytest.fixture(scope="session")
def book_dirs(tmp_path_factory) -> dict[str, str]:
    """``runs_dir`` and ``cache_dir`` shared by the chapters, in order, as in ``make book``."""
    base = tmp_path_factory.mktemp("book-build")
    return {"runs_dir": str(base / "runs"), "cache_dir": str(base / "cache")}


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_chapter_runs_in_smoke_profile(chapter, request, book_dirs, tmp_path):
    declared = set(build.declared_parameters(_as_ipynb(chapter, tmp_path)))
    available = {
        "profile": "smoke",
        "data_dir": str(request.getfixturevalue("book_phantom"))
        if "data_dir" in declared
        else None,
        "brats_dir": None,
        "harvard_dir": _optional_dir(request, "harvard_dir") if "harvard_dir" in declared else None,
        "gfp_dir": _optional_dir(request, "gfp_dir") if "gfp_dir" in declared else None,
        "device": "cpu",
        **book_dirs,
    }
    executed = tmp_path / f"{Path(chapter.docname).name}.ipynb"
    try:
        passed = build.execute_chapter(chapter, executed, available, cwd=REPO, timeout=900)
    except build.BuildError as err:
        pytest.fail(str(err))
    assert set(passed) == declared & set(available)
    assert executed.is_file()


def _as_ipynb(chapter, tmp_path: Path) -> Path:
    notebook = tmp_path / "source.ipynb"
    build.markdown_to_ipynb(chapter.source, notebook)
    return notebook
