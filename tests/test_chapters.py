"""Every chapter of the book (``book/*.md`` notebooks) follows the book's rules.

That every chapter *runs* is checked by nbval in ``make test`` (or ``make nbval``): the
Makefile's ``notebooks`` target prepares the chapters through ``book/build.py`` as
``make book PROFILE=smoke`` does (jupytext; papermill injects only the parameters a chapter
declares; the phantom with the smoke profile's cases; the Harvard and GFP folders of the shared
real data when present) without running them, and ``pytest --nbval-lax`` runs each prepared
notebook once, failing on the first cell that raises.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import load_book_build

REPO = Path(__file__).resolve().parents[1]

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


# A code cell or code block holds this many characters at the book's 12-pixel code font in a
# 1280-pixel window (book/build.py, BOOK_CSS); longer lines scroll sideways.
# tests/test_book_pages.py checks the rendered pages themselves.
CODE_LINE_LIMIT = 86


@pytest.mark.parametrize("page", sorted((REPO / "book").glob("*.md")), ids=lambda p: p.name)
def test_code_fits_the_page_without_scrolling(page):
    """Every line of the page's code cells and fenced code blocks (not of other MyST
    directives, such as the API page's eval-rst)."""
    long, fence = [], None
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence else line.strip()
        elif fence and len(line) > CODE_LINE_LIMIT and (
            not fence.startswith("```{") or fence.startswith("```{code-cell}")
        ):
            long.append(f"line {n}: {len(line)} characters: {line.strip()[:60]}")
    assert not long, (
        f"{page}: code lines over {CODE_LINE_LIMIT} characters scroll sideways in the book:\n"
        + "\n".join(long)
    )
