"""Fusion quality metrics with the convention as an explicit argument (Table 2 of the paper).

The same metric name gives very different numbers across fusion papers: MI in nats or bits,
SSIM as the sum or the mean of SSIM(F, A) and SSIM(F, B) with different windows and data
ranges, PSNR with peak 255 or max(F) or on a [0, 1] scale. Every function here therefore takes
``convention``, and every number the project prints names the convention that produced it.
The formulas are written out in the book's appendix (``book/appendix_fusion_metrics.md``);
chapter 5 (``book/05_fusion_benchmarks.md``) shows how far the convention alone moves a table.

Conventions (:data:`CONVENTIONS`):

``"standard"``
    The textbook definitions, float64, images on 0..255. EN and MI in bits; MI = MI(F,A) +
    MI(F,B) from 256×256 joint histograms; PSNR with peak 255 and MSE = mean of MSE(F,A) and
    MSE(F,B); SSIM = the MEAN of SSIM(F,A) and SSIM(F,B) with Wang et al.'s Gaussian window
    (σ = 1.5, 11×11), population covariance, data range 255, a 5-pixel border cropped;
    Q^AB/F (Xydeas–Petrović) as below; VIF = VIF(A,F) + VIF(B,F) (Sheikh–Bovik multi-scale
    pixel domain); SCD = corr(A, F−B) + corr(B, F−A). VIF and SCD are NaN where undefined.
``"cddfuse"``
    Exactly what CDDFuse's ``utils/Evaluator.py`` computes (the evaluator most recent medical
    fusion papers copy): MI in **nats**; PSNR with peak **max(F)**; SSIM = the **SUM** of
    skimage 0.19's default SSIMs (7×7 uniform window, sample covariance, float32 arithmetic)
    with the effective **data range 2** that skimage 0.19 infers from float32 input
    (``SSIM_data_range_255`` gives the same with data range 255); VIF falls back to 1.0 where
    the reference image is constant (its NaN guard); SCD is NaN where undefined.
``"matlab_tang"``
    Linfeng Tang's MATLAB evaluation scripts (``analysis_Reference.m``), as run under Octave:
    like ``standard`` for EN, SD, SF, MI (bits), Q^AB/F, but PSNR = 20 log10(255 / sqrt(MSE01))
    with the MSE on the [0, 1] scale (= standard PSNR + 48.13 dB), ``MSE`` on the [0, 1] scale,
    VIF as cddfuse; SSIM is not reproduced (NaN; the reference could not run MATLAB's ssim).

Inputs: ``fused``, ``a``, ``b`` are 2-D arrays of the same shape on the 0..255 scale (uint8 or
float; a colour source enters as its BT.601 Y channel, ``fuse4seg.data.pairs.read_grey``).
Histogram metrics (EN, MI) bin the values rounded half-to-even to integers 0..255, which is what
the published evaluators see after the fused image is saved to and re-read from an 8-bit PNG.
Pass uint8 images (``to_uint8``) to score exactly what a PNG holds.

Every value is checked against the reference file of the project's tests (computed by the
original evaluators) to a relative 1e-4.

Speed (issue 9; the same values to ~1e-10 relative, checked against the code before it by
``tests/test_fusion_metrics.py``): the per-pixel work of VIF, the standard SSIM and their
Gaussian filter is compiled with numba (``cache=True``: a fresh install compiles each kernel
once, in about a second, and later processes load it from ``__pycache__``). VIF's and the
standard SSIM's Gaussian windows are 'valid' separable filters by direct loops
(``_valid_filter``), float64 (float32 moves VIF by 2e-5); the moment stack ``[A, B, F, A², B²,
F², AF, BF]`` is built once per call and filtered by both; VIF's decimation computes only the
outputs it keeps, and its terms and SSIM's index are each one pass over the filtered moments
(VIF takes one logarithm per 32 terms, of their product); Q^AB/F stays NumPy (a compiled pass
was tried and dropped, ``benchmarks/RESULTS.md``): the Sobel responses of the three images at
once (int16 for uint8 inputs), then magnitudes, angles, the two sigmoids and the weighted sums
only at the pixels where a source has a gradient, in reused work arrays; MI looks its ``c ln c``
up in a table; MSE and PSNR share one error; work arrays are kept per thread between calls
(``_scratch``); one :func:`fusion_metrics` call shares the grey levels, the moments and the
cddfuse SSIM statistics between metrics.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fuse4seg.metrics.kernels import (  # noqa: F401  (tests reach them through this module)
    _bool_scratch,
    _gaussian_taps,
    _moments_stack,
    _scratch,
    _sobel,
    _valid_filter,
)
from fuse4seg.metrics.ssim import _ssim_from_stats, _ssim_gaussian, _ssim_stats  # noqa: F401
from fuse4seg.metrics.vif import _vif, _vif_window  # noqa: F401

__all__ = [
    "CONVENTIONS",
    "EXTRA_METRICS",
    "METRICS",
    "PAPER_METRICS",
    "FusionMeter",
    "check_metric_names",
    "entropy",
    "fusion_metrics",
    "mutual_information",
    "mse",
    "psnr",
    "qabf",
    "scd",
    "spatial_frequency",
    "ssim",
    "standard_deviation",
    "to_uint8",
    "vif",
]

CONVENTIONS: tuple[str, ...] = ("standard", "cddfuse", "matlab_tang")
"""The conventions :func:`fusion_metrics` reproduces (module docstring, book appendix)."""

PAPER_METRICS: tuple[str, ...] = ("EN", "SD", "MI", "PSNR", "SF", "Qabf", "SSIM")
"""The seven metrics of the paper's Table 2, in its column order."""

METRICS: tuple[str, ...] = PAPER_METRICS + ("VIF", "SCD")
"""The nine metrics :func:`fusion_metrics` computes by default."""

EXTRA_METRICS = ("MSE", "SSIM_data_range_255")
"""The names :func:`fusion_metrics` takes beside :data:`METRICS`: ``MSE``, and
``SSIM_data_range_255``, which only the ``cddfuse`` convention defines (NaN in the others)."""


def check_metric_names(names: Iterable[str]) -> list[str]:
    """``names`` as a list, each one of :data:`METRICS` or :data:`EXTRA_METRICS`.

    Raises:
        ValueError: the unknown names, with the valid ones.
    """
    names = list(names)
    valid = list(METRICS) + list(EXTRA_METRICS)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid: {', '.join(valid)}")
    return names


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: choose one of {list(CONVENTIONS)}")
    return convention


def _as_image(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D grey image (H, W), got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) < 2:
        raise ValueError(f"{name}: image too small ({arr.shape}); need at least 2x2")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected a real-valued image, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):  # finite by construction; range on the integers
        lo, hi = float(arr.min()), float(arr.max())
        arr = arr.astype(np.float64)
    else:
        arr = arr.astype(np.float64, copy=False)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 255 + 1e-6:
        raise ValueError(f"{name}: values must lie on the 0..255 scale, got min {lo:g}, max {hi:g}")
    if np.issubdtype(np.asarray(x).dtype, np.floating) and 0 < hi <= 1.0:
        warnings.warn(
            f"{name}: float image with max {hi:g} <= 1; fusion metrics expect the 0..255 scale "
            "(multiply by 255 first)",
            stacklevel=3,
        )
    return arr


def _check_triplet(fused, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f, a, b = _as_image(fused, "fused"), _as_image(a, "a"), _as_image(b, "b")
    if not (f.shape == a.shape == b.shape):
        raise ValueError(
            f"shape mismatch: fused {f.shape}, a {a.shape}, b {b.shape} (all must be equal)"
        )
    return f, a, b


def to_uint8(x: Any) -> np.ndarray:
    """Round (half-to-even) and clip an image on the 0..255 scale to uint8, as a PNG holds it.

    Args:
        x: ``(H, W)`` array (a float fused image on 0..255, e.g. ``255 * x_fused``).

    Returns:
        ``(H, W)`` uint8.
    """
    return np.clip(np.round(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8)


def _levels(x: np.ndarray) -> np.ndarray:
    """Integer grey levels 0..255 (round half-to-even), as int64 for histogramming."""
    return np.clip(np.round(x), 0, 255).astype(np.int64)


def _cached_levels(f, a, b, cache, which=(0, 1, 2)) -> tuple[np.ndarray, ...]:
    """``_levels`` of ``(f, a, b)[i]`` for ``i`` in ``which``, each computed once per
    :func:`fusion_metrics` call (``cache["uint8"]`` holds the inputs when all three were
    uint8: their levels are themselves)."""
    images = (f, a, b)
    out = []
    for i in which:
        key = ("levels", i)
        if cache is not None and key in cache:
            out.append(cache[key])
            continue
        if cache is not None and "uint8" in cache:
            level = cache["uint8"][i].astype(np.int64)
        else:
            level = _levels(images[i])
        if cache is not None:
            cache[key] = level
        out.append(level)
    return tuple(out)


# --------------------------------------------------------------------------- EN, SD, SF


def _entropy_of_levels(levels: np.ndarray, log=np.log2) -> float:
    p = np.bincount(levels.ravel(), minlength=256) / levels.size
    p = p[p > 0]
    return float(-(p * log(p)).sum())


def entropy(fused: Any, convention: str = "standard") -> float:
    """EN: Shannon entropy of the 256-bin grey-level histogram of F, in bits (every convention).

    ``EN = -Σ_l p_l log2 p_l`` over levels with ``p_l > 0``. Higher means more grey levels
    are used; noise raises it too, so EN alone rewards nothing in particular.

    Args:
        fused: ``(H, W)`` on 0..255 (values rounded to integer levels).
        convention: any of :data:`CONVENTIONS` (all agree).

    Returns:
        EN in bits, in ``[0, 8]``.
    """
    _check_convention(convention)
    return _entropy_of_levels(_levels(_as_image(fused, "fused")))


def standard_deviation(fused: Any, convention: str = "standard") -> float:
    """SD: population standard deviation (ddof = 0) of F on 0..255 (every convention)."""
    _check_convention(convention)
    return float(np.std(_as_image(fused, "fused")))


def spatial_frequency(fused: Any, convention: str = "standard") -> float:
    """SF = sqrt(RF² + CF²) on 0..255 (every convention).

    ``RF² = mean((F[i, j+1] − F[i, j])²)`` over ``H × (W−1)`` horizontal differences,
    ``CF² = mean((F[i+1, j] − F[i, j])²)`` over ``(H−1) × W`` vertical differences.
    """
    _check_convention(convention)
    return _sf(_as_image(fused, "fused"))


def _sf(f: np.ndarray) -> float:
    rf2 = np.mean(np.square(np.diff(f, axis=1)))
    cf2 = np.mean(np.square(np.diff(f, axis=0)))
    return float(np.sqrt(rf2 + cf2))


# --------------------------------------------------------------------------- MI


@functools.lru_cache(maxsize=8)
def _xlogx(n: int) -> np.ndarray:
    """``c · ln c`` for the counts ``c = 0..n`` (0 for 0): MI without a logarithm per bin."""
    c = np.arange(n + 1, dtype=np.float64)
    table = np.zeros(n + 1)
    np.multiply(c[1:], np.log(c[1:]), out=table[1:])
    table.flags.writeable = False
    return table


def _joint_mi(x: np.ndarray, y: np.ndarray, saturate: bool = False) -> float:
    """MI in nats of two level images from their 256×256 joint histogram (one bincount):
    with counts c and N pixels, ``Σ p_xy ln(p_xy / (p_x p_y)) = ln N + (Σ c_xy ln c_xy −
    Σ c_x ln c_x − Σ c_y ln c_y) / N``, each ``c ln c`` looked up (``_xlogx``). Equal to
    the sum over the table's cells to ~1e-15. ``saturate``: MATLAB's ``H(X) + H(Y) − H(X, Y)``
    whose joint histogram (only) puts levels 254 and 255 into one bin (``Hab.m``)."""
    n = x.size
    table = _xlogx(n)
    joint = np.bincount((x * 256 + y).ravel(), minlength=65536).reshape(256, 256)
    marginals = table[joint.sum(axis=1)].sum() + table[joint.sum(axis=0)].sum()
    if saturate:  # fold row and column 255 into 254
        joint[254] += joint[255]
        joint[:, 254] += joint[:, 255]
        joint[255] = 0
        joint[:, 255] = 0
    return math.log(n) + (table[joint].sum() - marginals) / n


def _mi(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    f, a, b = _cached_levels(f, a, b, cache)
    saturate = convention == "matlab_tang"
    nats = _joint_mi(f, a, saturate) + _joint_mi(f, b, saturate)
    return nats if convention == "cddfuse" else nats / math.log(2)


def mutual_information(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """MI = MI(F, A) + MI(F, B), with ``MI(X, Y) = Σ p_xy log(p_xy / (p_x p_y))``.

    Joint histograms have 256×256 bins over integer grey levels.

    Conventions: ``standard`` and ``matlab_tang`` in **bits** (log2); ``cddfuse`` in **nats**
    (natural log; sklearn's ``mutual_info_score``), i.e. the bits value × ln 2.
    ``matlab_tang`` also reproduces ``Hab.m``'s saturating ``uint8(x) + 1`` bin index, which
    puts levels 254 and 255 into one joint bin.

    Returns:
        MI (≥ 0; at most 16 bits).
    """
    return _mi(*_check_triplet(fused, a, b), _check_convention(convention))


# --------------------------------------------------------------------------- MSE, PSNR


def _mean_square_error(f: np.ndarray, a: np.ndarray, b: np.ndarray, cache=None) -> float:
    """(mean((A − F)²) + mean((B − F)²)) / 2 on 0..255, once per call (MSE and PSNR)."""
    if cache is not None and "mse" in cache:
        return cache["mse"]
    value = 0.5 * (np.mean(np.square(a - f)) + np.mean(np.square(b - f)))
    if cache is not None:
        cache["mse"] = value
    return value


def _mse(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    value = _mean_square_error(f, a, b, cache)
    return float(value / 255.0**2 if convention == "matlab_tang" else value)


def mse(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """MSE = (MSE(F, A) + MSE(F, B)) / 2, on 0..255 (``matlab_tang``: on the [0, 1] scale)."""
    return _mse(*_check_triplet(fused, a, b), _check_convention(convention))


def _psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    err = _mean_square_error(f, a, b, cache)
    with np.errstate(divide="ignore", invalid="ignore"):
        if convention == "standard":
            return float(10 * np.log10(255.0**2 / err))
        if convention == "cddfuse":
            return float(10 * np.log10(np.max(f) ** 2 / err))
        return float(20 * np.log10(255.0 / np.sqrt(err / 255.0**2)))


def psnr(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """PSNR in dB against both sources, with the MSE of :func:`mse`.

    - ``standard``: ``10 log10(255² / MSE)`` (peak fixed at 255).
    - ``cddfuse``: ``10 log10(max(F)² / MSE)`` (peak = the fused image's maximum).
    - ``matlab_tang``: ``20 log10(255 / sqrt(MSE01))`` with MSE01 on the [0, 1] scale,
      i.e. the standard value + 20 log10(255) = +48.13 dB.

    Returns:
        PSNR in dB (``inf`` when F equals both sources).
    """
    return _psnr(*_check_triplet(fused, a, b), _check_convention(convention))


# --------------------------------------------------------------------------- Q^AB/F

# Xydeas & Petrović (2000) constants, as in every evaluator we reproduce.
_QABF_TG, _QABF_KG, _QABF_DG = 0.9994, -15.0, 0.5
_QABF_TA, _QABF_KA, _QABF_DA = 0.9879, -22.0, 0.8


def _qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    # Integer images (uint8 inputs of fusion_metrics) take the Sobel responses in int16: exact
    # (|s| ≤ 4 · 255), and a quarter of float64's memory traffic.
    exact = cache is not None and "uint8" in cache
    images = _scratch("qabf_in", (3, *f.shape), np.int16 if exact else np.float64)
    if exact:
        f, a, b = cache["uint8"]
    images[0], images[1], images[2] = a, b, f
    sx, sy = _sobel(images)
    sx, sy = sx.reshape(3, -1), sy.reshape(3, -1)
    # A pixel weighs g_S in both sums, so only pixels where a source has a gradient add a
    # term: gather those (a third of a Harvard image: the background is flat) and compute
    # Q^SF there without masks, in the reference's order of operations, in prefixes of
    # reused arrays (fresh ones cost a page fault per 4 KB).
    edge = _bool_scratch("qabf_edge", (2, sx.shape[1]))
    np.not_equal(sx[:2], 0, out=edge)
    np.not_equal(sy[:2], 0, out=_bool_scratch("qabf_edge_y", edge.shape))
    edge |= _bool_scratch("qabf_edge_y", edge.shape)
    np.logical_or(edge[0], edge[1], out=edge[0])
    idx = np.flatnonzero(edge[0])
    if idx.size == 0:
        return float("nan")  # both sources constant: 0/0
    size = sx.size

    def work(name: str, rows: int, dtype=np.float64) -> np.ndarray:
        return _scratch(name, (size,), dtype)[: rows * idx.size].reshape(rows, idx.size)

    gx, gy = work("qabf_gx", 3), work("qabf_gy", 3)  # (3, L): A, B, F at those pixels
    if exact:
        gx16, gy16 = work("qabf_gx16", 3, np.int16), work("qabf_gy16", 3, np.int16)
        np.take(sx, idx, axis=1, out=gx16, mode="clip")  # (mode "raise" buffers ``out``)
        np.take(sy, idx, axis=1, out=gy16, mode="clip")
        gx[...], gy[...] = gx16, gy16
    else:
        np.take(sx, idx, axis=1, out=gx, mode="clip")
        np.take(sy, idx, axis=1, out=gy, mode="clip")
    g = work("qabf_g", 3)
    tmp = work("qabf_tmp", 3)
    np.multiply(gx, gx, out=g)
    np.multiply(gy, gy, out=tmp)
    g += tmp
    np.sqrt(g, out=g)
    g_src, g_f = g[:2], g[2]
    den = float(np.sum(g_src))
    flat = work("qabf_flat", 3, np.bool_)  # α = arctan(s_y / s_x), π/2 where s_x = 0
    np.equal(gx, 0, out=flat)
    np.copyto(gx, 1.0, where=flat)
    angle = np.divide(gy, gx, out=gy)
    np.arctan(angle, out=angle)
    np.copyto(angle, math.pi / 2, where=flat)
    strength, orient = tmp[:2], work("qabf_orient", 2)
    np.minimum(g_src, g_f, out=strength)  # G = min / max, and g_F where g_S = g_F (quirk)
    np.maximum(g_src, g_f, out=orient)
    with np.errstate(invalid="ignore"):  # 0/0 where g_S = g_F = 0, replaced just below
        strength /= orient
    same = flat[:2]
    np.equal(g_src, g_f, out=same)
    np.copyto(strength, np.broadcast_to(g_f, g_src.shape), where=same)
    q = np.subtract(strength, _QABF_DG, out=strength)  # Γ_g / (1 + e^{k_g (G − D_g)})
    q *= _QABF_KG
    np.exp(q, out=q)
    q += 1
    np.divide(_QABF_TG, q, out=q)
    np.subtract(angle[:2], angle[2], out=orient)  # A = 1 − |α_S − α_F| / (π/2), then
    np.abs(orient, out=orient)  # Γ_a / (1 + e^{k_a (A − D_a)})
    orient /= math.pi / 2
    np.subtract(1.0, orient, out=orient)
    orient -= _QABF_DA
    orient *= _QABF_KA
    np.exp(orient, out=orient)
    orient += 1
    np.divide(_QABF_TA, orient, out=orient)
    q *= orient
    q *= g_src  # Q^SF · g_S, 0 where g_S = 0
    return float(np.sum(q) / den)


def qabf(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """Q^AB/F, the Xydeas–Petrović edge-preservation metric (every convention; float64).

    For each source S ∈ {A, B}: Sobel magnitude g and angle α = arctan(s_y / s_x)
    (π/2 where s_x = 0); relative strength G^SF = min(g_S, g_F) / max(g_S, g_F), and
    G^SF = g_F where g_S = g_F (the quirk every evaluator inherits from the MATLAB original:
    0 where both are 0, g_F instead of 1 elsewhere); relative orientation
    A^SF = 1 − abs(α_S − α_F) / (π/2); preservation
    Q^SF = Γ_g / (1 + e^{k_g (G^SF − D_g)}) · Γ_a / (1 + e^{k_a (A^SF − D_a)}) with
    Γ_g = 0.9994, k_g = −15, D_g = 0.5, Γ_a = 0.9879, k_a = −22, D_a = 0.8; then
    Q^AB/F = Σ (Q^AF g_A + Q^BF g_B) / Σ (g_A + g_B).

    Returns:
        Q^AB/F in [0, 1] (NaN when both sources are constant: 0/0).
    """
    return _qabf(*_check_triplet(fused, a, b), _check_convention(convention))


# --------------------------------------------------------------------------- SSIM


def ssim(fused: Any, a: Any, b: Any, convention: str = "standard", data_range=None) -> float:
    """SSIM of the fused image against both sources, in each convention's form.

    - ``standard``: ``(SSIM(F, A) + SSIM(F, B)) / 2`` — the MEAN, at most 1 — with the
      Gaussian window (σ = 1.5, 11×11), population covariance, ``data_range = 255``,
      K1 = 0.01, K2 = 0.03, float64, the map averaged after cropping 5 pixels per side.
    - ``cddfuse``: ``SSIM(F, A) + SSIM(F, B)`` — the SUM, at most 2 — with skimage 0.19's
      defaults on float32 input: 7×7 uniform window, sample covariance (49/48), float32
      arithmetic, 3-pixel crop and ``data_range = 2`` (inferred from the float32 dtype range
      [−1, 1], although the images span 0..255: C1, C2 become negligible).
    - ``matlab_tang``: not reproduced (returns NaN): the reference run had no MATLAB ssim.

    Args:
        data_range: override the convention's data range (e.g. 255 with ``cddfuse`` gives the
            reference's ``SSIM_data_range_255``).

    Returns:
        The SSIM value (NaN for ``matlab_tang``).
    """
    return _ssim(*_check_triplet(fused, a, b), _check_convention(convention), data_range)


def _ssim(f, a, b, convention: str, data_range: float | None = None, cache=None) -> float:
    if min(f.shape) < 11:
        raise ValueError(f"ssim: images must be at least 11x11, got {f.shape}")
    if convention == "matlab_tang":
        return float("nan")
    standard = convention == "standard"
    if data_range is None:
        data_range = 255.0 if standard else 2.0
    if standard:
        vals = _ssim_gaussian(f, a, b, data_range, cache)
        return 0.5 * (vals[0] + vals[1])
    key = "ssim_stats"  # the cddfuse statistics, shared by its two data ranges
    if cache is not None and key in cache:
        stats = cache[key]
    else:
        stats = _ssim_stats(f, [a, b])
        if cache is not None:
            cache[key] = stats
    vals = _ssim_from_stats(stats, data_range)
    return vals[0] + vals[1]


# --------------------------------------------------------------------------- VIF


def vif(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """VIF = VIF(A, F) + VIF(B, F): Sheikh & Bovik's multi-scale pixel-domain visual
    information fidelity (``vifp_mscale``), the SUM over both sources in every convention.

    Per scale s = 1..4: Gaussian window N = 2^(5−s) + 1, sd = N/5; for s > 1 both images are
    filtered ('valid') and decimated by 2 first. Local statistics give the gain
    g = σ_RD / σ_R² and the distortion variance σ_V² = σ_D² − g σ_RD (with the reference
    implementation's guards); VIF = Σ log10(1 + g² σ_R² / (σ_V² + σ_n²)) /
    Σ log10(1 + σ_R² / σ_n²), σ_n² = 2, summed over scales.

    Conventions differ only where one VIF term is 0/0 (a constant reference): ``standard``
    gives NaN, ``cddfuse`` and ``matlab_tang`` the reference code's fallback 1.0.

    Raises:
        ValueError: images smaller than 41×41 (the fourth scale has no valid pixels).
    """
    return _vif(*_check_triplet(fused, a, b), _check_convention(convention))


# --------------------------------------------------------------------------- SCD


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = (x - x.mean()).ravel(), (y - y.mean()).ravel()
    den = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))  # exactly 0 if constant
    return float(np.dot(xc, yc)) / den if den != 0 else float("nan")


def _scd(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str) -> float:
    return _corr(a, f - b) + _corr(b, f - a)


def scd(fused: Any, a: Any, b: Any, convention: str = "standard") -> float:
    """SCD, the sum of the correlations of differences (Aslantas & Bendes, 2015):
    ``corr(A, F − B) + corr(B, F − A)`` with Pearson's correlation over the whole image.

    NaN (0/0) in every convention when F − B or F − A is constant (e.g. F = A), or a source
    is constant.
    """
    return _scd(*_check_triplet(fused, a, b), _check_convention(convention))


# --------------------------------------------------------------------------- all at once

_FUNCS = {  # metric -> implementation on checked float64 images, with a per-call cache
    "EN": lambda f, a, b, c, k: _entropy_of_levels(_cached_levels(f, a, b, k, (0,))[0]),
    "SD": lambda f, a, b, c, k: float(np.std(f)),
    "SF": lambda f, a, b, c, k: _sf(f),
    "MI": _mi,
    "PSNR": _psnr,
    "MSE": _mse,
    "Qabf": _qabf,
    "SSIM": lambda f, a, b, c, k: _ssim(f, a, b, c, cache=k),
    "VIF": _vif,
    "SCD": lambda f, a, b, c, k: _scd(f, a, b, c),
}


def fusion_metrics(
    fused: Any,
    a: Any,
    b: Any,
    convention: str = "standard",
    metrics: Iterable[str] | None = None,
) -> dict[str, float]:
    """Score a fused image against its two sources.

    Args:
        fused, a, b: ``(H, W)`` grey images on 0..255 (uint8 or float), H, W ≥ 41 for VIF,
            ≥ 11 for SSIM. A colour source enters as its Y channel.
        convention: ``"standard"``, ``"cddfuse"`` or ``"matlab_tang"`` (module docstring).
        metrics: names out of ``METRICS`` plus ``"MSE"`` and (cddfuse) ``"SSIM_data_range_255"``;
            default: the nine of :data:`METRICS` plus ``MSE`` (and ``SSIM_data_range_255`` for
            ``cddfuse``).

    Returns:
        ``{name: value}`` in the requested order; NaN marks a value that is undefined (0/0) or
        not reproduced in that convention.

    Raises:
        ValueError: unknown convention or metric name; shapes differ; values off 0..255.

    Explained in chapter 5 and the appendix (``book/appendix_fusion_metrics.md``).
    """
    convention = _check_convention(convention)
    if metrics is None:
        names = list(METRICS) + ["MSE"]
        if convention == "cddfuse":
            names.append("SSIM_data_range_255")
    else:
        names = check_metric_names(metrics)
    originals = [np.asarray(x) for x in (fused, a, b)]
    f, a, b = _check_triplet(*originals)
    cache: dict[str, Any] = {}  # what several metrics share: grey levels, SSIM statistics
    if all(x.dtype == np.uint8 for x in originals):
        cache["uint8"] = originals
    out: dict[str, float] = {}
    for name in names:
        if name == "SSIM_data_range_255":
            out[name] = (
                _ssim(f, a, b, "cddfuse", data_range=255.0, cache=cache)
                if convention == "cddfuse"
                else float("nan")
            )
        else:
            out[name] = _FUNCS[name](f, a, b, convention, cache)
    return out


class FusionMeter:
    """Accumulates :func:`fusion_metrics` over pairs; ``compute()`` gives per-pair values and
    the mean over pairs (NaNs are skipped in the mean; ``count`` says how many entered it).

    Example::

        meter = FusionMeter("standard")
        for pair, fused in ...:
            meter.update(fused, pair.a, pair.b, name=pair.name)
        table = meter.compute()["mean"]
    """

    def __init__(self, convention: str = "standard", metrics: Iterable[str] | None = None):
        self.convention = _check_convention(convention)
        self.metrics = None if metrics is None else list(metrics)
        self.reset()

    def reset(self) -> None:
        self._rows: dict[str, dict[str, float]] = {}

    def update(self, fused: Any, a: Any, b: Any, name: str | None = None) -> dict[str, float]:
        """Score one pair and remember it under ``name`` (default: its index); returns the row.

        Raises:
            ValueError: a name seen before (each pair is scored once).
        """
        name = str(len(self._rows)) if name is None else str(name)
        if name in self._rows:
            raise ValueError(f"FusionMeter: pair {name!r} was already scored")
        row = fusion_metrics(fused, a, b, self.convention, self.metrics)
        self._rows[name] = row
        return row

    def __len__(self) -> int:
        return len(self._rows)

    def compute(self) -> dict[str, Any]:
        """``{"convention", "per_pair": {name: row}, "mean": {metric: value},
        "count": {metric: pairs with a finite value}}``."""
        names: list[str] = []
        for row in self._rows.values():
            names.extend(k for k in row if k not in names)
        mean, count = {}, {}
        for k in names:
            vals = np.array([r[k] for r in self._rows.values() if k in r], dtype=np.float64)
            ok = np.isfinite(vals)
            count[k] = int(ok.sum())
            mean[k] = float(vals[ok].mean()) if ok.any() else float("nan")
        return {
            "convention": self.convention,
            "per_pair": {n: dict(r) for n, r in self._rows.items()},
            "mean": mean,
            "count": count,
        }


def nan_to_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None, recursively (for strict JSON: ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
