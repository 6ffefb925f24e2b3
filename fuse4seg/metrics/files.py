"""Score fused image files against their sources (the logic of ``fuse4seg metrics``).

One pair::

    fuse4seg metrics --fused F.png --a MRI.png --b PET.png [--convention cddfuse] [--json]

A folder of fused images (every ``<name>.png`` in ``--fused`` is matched by name with
``--a/<name>.png`` and ``--b/<name>.png``), one CSV row per pair::

    fuse4seg metrics --fused results/ --a test/MRI --b test/PET --csv metrics.csv

Every image is read as ``fuse4seg.data.pairs.read_grey`` reads it (a colour image becomes its
BT.601 luma, computed as the common evaluators do), and every output names the convention that
produced its numbers (chapter 5 and the appendix ``book/appendix_fusion_metrics.md``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from fuse4seg.metrics.fusion import (
    CONVENTIONS,
    EXTRA_METRICS,
    METRICS,
    FusionMeter,
    check_metric_names,
)

__all__ = [
    "check_pair_files",
    "conventions_of",
    "format_value",
    "parse_metric_names",
    "score_folder",
    "score_pair",
    "table_lines",
    "write_csv",
]

_IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def parse_metric_names(text: str | None, conventions: list[str] | None = None
                       ) -> list[str] | None:
    """The metric names of ``--metrics`` (``None``: the default set), checked.

    Raises:
        ValueError: an unknown name, none at all, or ``SSIM_data_range_255`` where none of
            ``conventions`` is ``cddfuse``, the only one that defines it (it would print NaN).
    """
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--metrics {text!r}: no metric named; give some of "
                         f"{', '.join(METRICS + EXTRA_METRICS)}, separated by commas")
    try:
        check_metric_names(names)
    except ValueError as exc:
        raise ValueError(f"--metrics: {exc}") from None
    if ("SSIM_data_range_255" in names and conventions is not None
            and "cddfuse" not in conventions):
        raise ValueError(
            f"--metrics SSIM_data_range_255: only the cddfuse convention defines it (CDDFuse's "
            f"evaluator's SSIM with data range 255), not {', '.join(conventions)}: give "
            "--convention cddfuse (or all)")
    return names


def conventions_of(choice: str) -> list[str]:
    return list(CONVENTIONS) if choice == "all" else [choice]


def check_pair_files(fused: Path, a: Path, b: Path) -> None:
    """One-pair mode of ``fuse4seg metrics``: ``--fused``, ``--a`` and ``--b`` must be files.

    Raises:
        ValueError: one of them is a folder (the message says to give three files or three
            folders). FileNotFoundError: one of them is missing.
    """
    _check_kind(fused, a, b, folders=False)


def _check_kind(fused: Path, a: Path, b: Path, folders: bool) -> None:
    """``--fused``, ``--a`` and ``--b`` are all files (one pair) or, with ``folders``, all
    folders: a ValueError names the one of the other kind, a FileNotFoundError a missing one."""
    kind, other = ("folder", "file") if folders else ("file", "folder")
    for path, what in ((fused, "--fused"), (a, "--a"), (b, "--b")):
        if path.is_file() if folders else path.is_dir():
            raise ValueError(f"{what} {path}: is a {other}, but --fused {fused} is a {kind}; "
                             "give three files (one pair) or three folders")
        if not (path.is_dir() if folders else path.is_file()):
            raise FileNotFoundError(f"{what} {path}: {kind} not found")


def _check_sizes(which: str, fused: tuple, a: tuple, b: tuple) -> None:
    """The three images of a pair ``(path, image)`` have one size, else a ValueError names them;
    ``which`` follows "size mismatch" in the message (``""``, or ``" for 'name'"`` in a folder)."""
    if not (fused[1].shape == a[1].shape == b[1].shape):
        raise ValueError(
            f"size mismatch{which}: {fused[0]} is {fused[1].shape}, {a[0]} is {a[1].shape}, "
            f"{b[0]} is {b[1].shape}"
        )


def score_pair(
    fused: Path, a: Path, b: Path, conventions: list[str], metrics: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Read three images and return ``{convention: {metric: value}}``.

    Raises:
        FileNotFoundError: a missing file. ValueError: unreadable image or size mismatch (the
            message names the files).
    """
    from fuse4seg.data.pairs import read_grey

    f_img, a_img, b_img = read_grey(fused), read_grey(a), read_grey(b)
    _check_sizes("", (fused, f_img), (a, a_img), (b, b_img))
    out = {}
    for conv in conventions:
        meter = FusionMeter(conv, metrics)
        out[conv] = meter.update(f_img, a_img, b_img, name=fused.stem)
    return out


def _images_by_stem(folder: Path) -> dict[str, Path]:
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
    by_stem: dict[str, Path] = {}
    for p in files:
        if p.stem in by_stem:
            raise ValueError(
                f"{folder}: two images named {p.stem!r} ({by_stem[p.stem].name}, "
                f"{p.name}); keep one"
            )
        by_stem[p.stem] = p
    return by_stem


def score_folder(
    fused_dir: Path,
    a_dir: Path,
    b_dir: Path,
    conventions: list[str],
    metrics: list[str] | None = None,
) -> dict[str, dict]:
    """Score every image of ``fused_dir`` against the same-named images in ``a_dir``, ``b_dir``.

    Returns:
        ``{convention: FusionMeter.compute()}`` (per pair and mean).

    Raises:
        ValueError: an empty folder, a file given for a folder, or fused images without a
            source of the same name (all are named). FileNotFoundError: a missing folder.
    """
    from fuse4seg.data.pairs import read_grey

    _check_kind(fused_dir, a_dir, b_dir, folders=True)
    fused, src_a, src_b = (_images_by_stem(d) for d in (fused_dir, a_dir, b_dir))
    if not fused:
        raise ValueError(f"--fused {fused_dir}: no images ({', '.join(_IMAGE_SUFFIXES)})")
    missing = [f"{n} (no {a_dir / n}.*)" for n in fused if n not in src_a]
    missing += [f"{n} (no {b_dir / n}.*)" for n in fused if n not in src_b]
    if missing:
        raise ValueError("fused images without a source of the same name: " + "; ".join(missing))
    meters = {c: FusionMeter(c, metrics) for c in conventions}
    for name, path in fused.items():
        f_img, a_img, b_img = read_grey(path), read_grey(src_a[name]), read_grey(src_b[name])
        _check_sizes(f" for {name!r}", (path, f_img), (src_a[name], a_img), (src_b[name], b_img))
        for meter in meters.values():
            meter.update(f_img, a_img, b_img, name=name)
    return {c: m.compute() for c, m in meters.items()}


def format_value(v: float) -> str:
    """A metric value for a table or CSV cell (``nan`` for missing; ``0``, not ``-0``)."""
    return "nan" if not math.isfinite(v) else f"{v + 0.0:.6g}"


def table_lines(rows: dict[str, dict[str, float]], header: str) -> list[str]:
    """The tables the metric verbs print: per convention of ``rows``
    (``{convention: {metric: value}}``), ``header`` with ``{conv}`` replaced by the
    convention's name, then one line per metric (values as :func:`format_value`)."""
    lines = []
    for conv, row in rows.items():
        lines.append(header.replace("{conv}", conv))
        lines.extend(f"  {k:>20}: {format_value(v)}" for k, v in row.items())
    return lines


def write_csv(path: Path, results: dict[str, dict]) -> None:
    from fuse4seg.utils import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names: list[str] = []
    for res in results.values():
        for row in res["per_pair"].values():
            names.extend(k for k in row if k not in names)
    writer.writerow(["name", "convention", *names])
    for conv, res in results.items():
        for pair, row in res["per_pair"].items():
            cells = (format_value(row[k]) if k in row else "" for k in names)
            writer.writerow([pair, conv, *cells])
    atomic_write_text(Path(path), buf.getvalue())
