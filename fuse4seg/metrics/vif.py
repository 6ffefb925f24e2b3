"""Visual information fidelity (VIF), the pixel-domain multi-scale form of Sheikh & Bovik.

The public function is :func:`fuse4seg.metrics.fusion.vif`; this module holds its arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from fuse4seg.metrics.kernels import _compiled, _moments_stack, _source_moments, _valid_filter

_VIF_SIGMA_NSQ = 2.0  # σ_n², the reference code's noise variance
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
    :data:`_LOG_GROUP` terms (:func:`_vif_scale_sums`). The first scale filters the moment
    stack the standard SSIM filters too (:func:`_source_moments`)."""
    sums = np.zeros((2, 2))  # [Σ log numerator terms, Σ log denominator terms] per source
    moments = _source_moments(f, a, b, cache)  # (8, H, W); its first three: A, B, F
    imgs = moments[:3]
    for scale in range(1, 5):
        w = _vif_window(scale)
        if scale > 1:  # (3, H, W) -> (3, (H - n) // 2 + 1, (W - n) // 2 + 1)
            imgs = _valid_filter(imgs, w, step=2, name="vif_pyramid")
            moments = _moments_stack("vif", imgs[:2], imgs[2])
        if min(moments.shape[1:]) < len(w):
            raise ValueError(f"vif: image too small for scale {scale} (need at least 41x41)")
        _vif_scale_sums(_valid_filter(moments, w, name="vif_m"), sums)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = sums[0] / sums[1]
    return float(out[0]), float(out[1])


_LOG_GROUP = 32
"""Terms per logarithm in :func:`_vif_scale_sums`. Every term is 1 + x with 0 ≤ x ≤
σ_max² / σ_n², σ_max² = 127.5² the largest variance of values on 0..255 (g² σ_R² ≤ σ_D² by
Cauchy–Schwarz), so a term is at most about 8.2e3 and a product of 32 at most about 1e125:
no overflow (a product past 1e250 is flushed early all the same)."""


@_compiled
def _vif_scale_sums(m, sums):  # pragma: no cover - compiled
    """Add one scale's Σ log(numerator terms) and Σ log(denominator terms) to ``sums``
    ``(2 [num, den], 2 sources)``, from the filtered moments ``m = [μ_A, μ_B, μ_F, E[A²],
    E[B²], E[F²], E[AF], E[BF]]`` ``(8, h, w)``.

    The reference code's arithmetic per pixel, fused into one pass: σ_R² = max(E[R²] − μ_R²,
    0), σ_D² likewise, σ_RD = E[RD] − μ_R μ_D, g = σ_RD / (σ_R² + ε), σ_V² = max(σ_D² −
    g σ_RD, ε); the numerator term 1 + g² σ_R² / (σ_V² + σ_n²) and the denominator term
    1 + σ_R² / σ_n². A flat reference (σ_R² < ε) drops both terms (log 1 = 0), a flat distorted
    image or a negative gain the numerator's. The logarithm, the costly part, is taken once
    per :data:`_LOG_GROUP` terms, of their product (a relative error of the product of ~32 ulp,
    about 1e-14 absolute per logarithm)."""
    h, w = m.shape[1], m.shape[2]
    eps, nsq = _VIF_EPS, _VIF_SIGMA_NSQ
    for s in range(2):
        log_num, log_den, p_num, p_den, count = 0.0, 0.0, 1.0, 1.0, 0
        for i in range(h):
            for j in range(w):
                mu_r, mu_d = m[s, i, j], m[2, i, j]
                s_r = max(m[3 + s, i, j] - mu_r * mu_r, 0.0)
                s_d = max(m[5, i, j] - mu_d * mu_d, 0.0)
                s_rd = m[6 + s, i, j] - mu_r * mu_d
                g = s_rd / (s_r + eps)
                s_v = max(s_d - g * s_rd, eps)
                if s_r >= eps:
                    p_den *= 1.0 + s_r / nsq
                    if g >= 0.0 and s_d >= eps:
                        p_num *= 1.0 + g * g * s_r / (s_v + nsq)
                count += 1
                if count == _LOG_GROUP or p_num > 1e250 or p_den > 1e250:
                    log_num += math.log(p_num)
                    log_den += math.log(p_den)
                    p_num, p_den, count = 1.0, 1.0, 0
        sums[0, s] += log_num + math.log(p_num)
        sums[1, s] += log_den + math.log(p_den)


def _vif(f: np.ndarray, a: np.ndarray, b: np.ndarray, convention: str, cache=None) -> float:
    terms = list(_vif_pair(a, b, f, cache))
    if convention != "standard":
        terms = [1.0 if math.isnan(t) else t for t in terms]
    return float(sum(terms))
