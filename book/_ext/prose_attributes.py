"""A Sphinx extension of the book's API page: attribute docstrings whose first line is prose.

napoleon reads the first line of an attribute's (or a property's) docstring as Google style's
``type: description`` wherever it holds a colon, so ``"Patient-level fractions (ours: the paper
gives no split)."`` would render with the type "Patient-level fractions (ours". Such a
docstring is kept as written: its lines are noted before napoleon runs and put back after it
(napoleon drops leading blank lines, so a blank line in front cannot stop it). A first line
whose text before the colon reads as a type (``numpy.ndarray``, ``str | None``, ``(extra,
span)``: no space but around ``|`` and after commas) keeps napoleon's reading.
"""

from __future__ import annotations

import re

_COLON = re.compile(r"(?<!:):(?![:\w])")  # a single colon, not a role's (``:py:func:``)
_CODE = re.compile(r"``.*?``|`[^`]*`")


def _type_like(text: str) -> bool:
    text = re.sub(r"\s*\|\s*", "|", text.strip())
    return bool(text) and not re.search(r"\s", re.sub(r",\s+", ",", text))


_KEPT: dict[str, list[str]] = {}


def note_prose(app, what, name, obj, options, lines: list[str]) -> None:
    """``autodoc-process-docstring`` handler, run before napoleon's (priority 400 < 500)."""
    if what not in ("attribute", "data", "property") or not lines or not lines[0].strip():
        return
    first = _CODE.sub(lambda m: "x" * len(m.group(0)), lines[0])  # colons in code are not
    colon = _COLON.search(first)
    if colon and not _type_like(lines[0][: colon.start()]):
        _KEPT[name] = list(lines)


def restore_prose(app, what, name, obj, options, lines: list[str]) -> None:
    """``autodoc-process-docstring`` handler, run after napoleon's (priority 600)."""
    kept = _KEPT.pop(name, None)
    if kept is not None:
        lines[:] = kept


def setup(app):
    app.connect("autodoc-process-docstring", note_prose, priority=400)
    app.connect("autodoc-process-docstring", restore_prose, priority=600)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
