"""How the book's tables write a number: a mean with its sd, a signed difference.

Both formatters live here so that every table of the book (chapter 4's learning curves and
paired intervals, chapter 6's Tables 1 and 3) and the benchmarks' summaries write numbers the
same way:

- :func:`format_mean_sd` — ``"0.512 ± 0.034"``, with a no-break space after ``±`` so that a
  narrow table cell wraps before the ``±``, never between the sign and its number;
- :func:`format_signed` — ``"+0.012"``, ``"-0.0004"``: a difference always shows its sign,
  and one that rounds to zero keeps the decimals that show on which side of 0 it lies.

Used by :mod:`fuse4seg.study`, :mod:`fuse4seg.results` and :mod:`fuse4seg.curves`.
"""

from __future__ import annotations

__all__ = ["format_mean_sd", "format_signed"]


def format_mean_sd(value: tuple[float, float | None] | float, digits: int = 3) -> str:
    """``"0.512 ± 0.034"``, or ``"0.512"`` without an sd.

    The space after ``±`` is a no-break space (U+00A0): a narrow table cell then wraps only
    before the ``±`` ("0.512" over "± 0.034"), never between the sign and its number.
    """
    mean, sd = value if isinstance(value, tuple) else (value, None)
    return f"{mean:.{digits}f}" + (f" ±\u00a0{sd:.{digits}f}" if sd is not None else "")


def format_signed(value: float, digits: int = 3) -> str:
    """``value`` with its sign and ``digits`` decimals (``"+0.012"``, ``"-0.045"``).

    A value that rounds to zero keeps as many more decimals (up to three) as show its sign:
    ``"-0.0004"``, not ``"-0.000"``, so a reader sees on which side of 0 an interval's bound
    lies. Zero itself is ``"0.000"``; a value still zero at ``digits + 3`` decimals is written
    in exponent form (``"-2.0e-08"``).
    """
    value = float(value)
    if value == 0:
        return f"{0.0:.{digits}f}"
    for places in range(digits, digits + 4):
        text = f"{value:+.{places}f}"
        if text.strip("+-0."):  # a non-zero digit (or nan, inf) shows
            return text
    return f"{value:+.1e}"
