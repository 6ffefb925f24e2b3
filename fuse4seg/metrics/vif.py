"""Visual information fidelity (VIF), the pixel-domain multi-scale form of Sheikh & Bovik.

The public function is :func:`fuse4seg.metrics.fusion.vif`; this module holds its arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from fuse4seg.metrics.kernels import (
    _bool_scratch,
    _moments_stack,
    _scratch,
    _source_moments,
    _valid_filter,
)

_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10


def _vif_window(scale: int) -> np.ndarray:
    """The 1-D factor of the scale's MATLAB-style Gaussian window (N = 2^(5−scale) + 1,
    sd = N / 5), normalised. The 2-D window is its outer product (no tap falls under the
    ``eps · max`` cut-off at these sizes, so the evaluators' 2-D window is separable)."""
    n = 2 ** (4 - scale + 1) + 1
    sd = n / 5.0
    x = np.arange(n) - (n - 1) / 2.0
    h = np.exp(-(x * x) / (2.0 * sd * sd))
    return h / h.sum()


def _vif_pair(a: np.ndarray, b: np.ndarray, f: np.ndarray, cache=None) -> tuple[float, float]:
    """Sheikh–Bovik pixel-domain VIF(A, F) and VIF(B, F), 4 scales, sharing F's statistics;
    each NaN when undefined (0/0, a constant reference).

    The reference code's guards, folded: a pixel whose reference is flat (σ_R² < ε), whose
    distorted image is flat (σ_D² < ε) or whose gain is negative ends with g = 0, so it adds
    log(1) = 0 to the numerator (and a flat reference adds 0 to the denominator). Natural
    logarithms replace log10 (the base cancels in the ratio), each taken of a product of
    :data:`_LOG_GROUP` terms (:func:`_sum_log`). The first scale filters the moment stack the
    standard SSIM filters too (:func:`_source_moments`)."""
    num, den = np.zeros(2), np.zeros(2)
    moments = _source_moments(f, a, b, cache)  # (8, H, W); its first three: A, B, F
    imgs = moments[:3]
    for scale in range(1, 5):
        w = _vif_window(scale)
        if scale > 1:  # (3, H, W) -> (3, (H - n) // 2 + 1, (W - n) // 2 + 1)
            imgs = _valid_filter(imgs, w, step=2, name="vif_pyramid")
            moments = _moments_stack("vif", imgs[:2], imgs[2])
        if min(moments.shape[1:]) < len(w):
            raise ValueError(f"vif: image too small for scale {scale} (need at least 41x41)")
        m = _valid_filter(moments, w, name="vif_m")
        _vif_terms(m, num, den)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return float(out[0]), float(out[1])


_LOG_GROUP = 32
"""Terms per logarithm in :func:`_sum_log`. Every term is 1 + x with 0 ≤ x ≤ σ_max² / σ_n²,
σ_max² = 127.5² the largest variance of values on 0..255 (g² σ_R² ≤ σ_D² by Cauchy–Schwarz),
so a term is at most about 8.2e3 and a product of 32 at most about 1e125: no overflow."""


def _sum_log(x: np.ndarray) -> np.ndarray:
    """``Σ log x`` over axes 1 and 2 of ``(2, h, w)`` terms x ≥ 1, as the sum of the logs of
    products of :data:`_LOG_GROUP` consecutive rows: 32 times fewer logarithms (the costly
    part of VIF's per-pixel work), at a relative error of the product of ~32 ulp, i.e. about
    1e-14 absolute per logarithm. Falls back to one log per term if a product overflows."""
    with np.errstate(over="ignore"):  # checked just below
        prods = np.multiply.reduceat(x, np.arange(0, x.shape[1], _LOG_GROUP), axis=1)
    if not np.isfinite(prods).all():  # not expected for images on 0..255
        prods = x
    return np.log(prods).sum(axis=(1, 2))


def _vif_terms(m: np.ndarray, num: np.ndarray, den: np.ndarray) -> None:
    """Add one scale's numerator and denominator sums to ``num`` and ``den`` (per source),
    from the filtered moments ``m = [μ_A, μ_B, μ_F, E[A²], E[B²], E[F²], E[AF], E[BF]]``.

    The same arithmetic as the reference code, in place in ``m`` and in reused scratch arrays
    (no fresh temporaries: at these sizes, allocating them costs more than the arithmetic);
    a term the guards drop becomes log(1)."""
    shape = m.shape[1:]
    tmp = _scratch("vif_tmp", (2, *shape))
    g = _scratch("vif_g", (2, *shape))
    sv = _scratch("vif_sv", (2, *shape))
    live = _bool_scratch("vif_live", (2, *shape))
    gained = _bool_scratch("vif_gained", (2, *shape))
    busy = _bool_scratch("vif_busy", shape)
    mu1, mu2 = m[0:2], m[2]
    s1, s2, s12 = m[3:5], m[5], m[6:8]
    np.multiply(mu1, mu1, out=tmp)
    np.subtract(s1, tmp, out=s1)  # σ_R² = E[R²] − μ_R²
    np.maximum(s1, 0, out=s1)
    np.multiply(mu2, mu2, out=tmp[0])
    np.subtract(s2, tmp[0], out=s2)  # σ_D²
    np.maximum(s2, 0, out=s2)
    np.multiply(mu1, mu2, out=tmp)
    np.subtract(s12, tmp, out=s12)  # σ_RD
    np.add(s1, _VIF_EPS, out=tmp)
    np.divide(s12, tmp, out=g)  # gain g = σ_RD / (σ_R² + ε)
    np.multiply(g, s12, out=tmp)
    np.subtract(s2, tmp, out=sv)  # σ_V² = σ_D² − g σ_RD
    np.maximum(sv, _VIF_EPS, out=sv)  # the reference's sv[sv <= eps] = eps
    # Flat reference, flat distorted image or negative gain: g = 0, a term log(1) = 0.
    np.greater_equal(s1, _VIF_EPS, out=live)
    np.greater_equal(g, 0, out=gained)
    gained &= live
    np.greater_equal(s2, _VIF_EPS, out=busy)
    gained &= busy
    np.multiply(g, g, out=tmp)
    tmp *= s1
    sv += _VIF_SIGMA_NSQ
    tmp /= sv
    tmp *= gained  # x · 1 = x exactly; 0 where dropped
    tmp += 1
    num += _sum_log(tmp)
    np.divide(s1, _VIF_SIGMA_NSQ, out=tmp)
    tmp *= live
    tmp += 1
    den += _sum_log(tmp)


def _vif(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    terms = list(_vif_pair(a, b, f, cache))
    if convention != "standard":
        terms = [1.0 if math.isnan(t) else t for t in terms]
    return float(sum(terms))
