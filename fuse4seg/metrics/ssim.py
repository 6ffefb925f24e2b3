"""The arithmetic of SSIM (local statistics and the per-source index) for
:func:`fuse4seg.metrics.fusion.ssim`, in its two windowings: Gaussian 11×11 σ 1.5 in float64
(the standard convention, ``_ssim_gaussian``) or uniform 7×7 in float32 (cddfuse,
``_ssim_stats`` and ``_ssim_from_stats``)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fuse4seg.metrics.kernels import (
    _compiled,
    _gaussian_taps,
    _scratch,
    _source_moments,
    _valid_filter,
)


@_compiled
def _ssim_means(filt, c1, c2, out):  # pragma: no cover - compiled
    """The mean SSIM map of each source into ``out`` (2,), from the filtered moments ``filt =
    [μ_A, μ_B, μ_F, E[A²], E[B²], E[F²], E[AF], E[BF]]`` ``(8, h, w)``, in one pass:
    population (co)variances σ = E[xy] − μ_x μ_y, then ``((2 μ_F μ_S + C1)(2 σ_FS + C2)) /
    ((μ_F² + μ_S² + C1)(σ_F² + σ_S² + C2))``, summed per row and then over rows."""
    h, w = filt.shape[1], filt.shape[2]
    for s in range(2):
        total = 0.0
        for i in range(h):
            row = 0.0
            for j in range(w):
                mu_f, mu_s = filt[2, i, j], filt[s, i, j]
                v_f = filt[5, i, j] - mu_f * mu_f
                v_s = filt[3 + s, i, j] - mu_s * mu_s
                v_fs = filt[6 + s, i, j] - mu_f * mu_s
                top = (2.0 * mu_f * mu_s + c1) * (2.0 * v_fs + c2)
                bottom = (mu_f * mu_f + mu_s * mu_s + c1) * (v_f + v_s + c2)
                row += top / bottom
            total += row
        out[s] = total / (h * w)


def _ssim_gaussian(f, a, b, data_range: float, cache=None) -> list[float]:
    """SSIM(F, A) and SSIM(F, B) of the standard convention: Wang et al. (2004) as skimage
    implements it with ``gaussian_weights=True`` (σ 1.5, truncate 3.5, so 11×11), population
    covariance, float64, 'reflect' borders and then a crop of 5 pixels per side. The crop
    removes exactly the pixels whose window reaches the border, so this is a 'valid' filtering
    (``_valid_filter``) of the moment stack VIF filters too (``_source_moments``),
    then the index per pixel and its mean (``_ssim_means``)."""
    taps = _gaussian_taps(1.5, 3.5)
    filt = _valid_filter(_source_moments(f, a, b, cache), taps, name="ssim_m")
    out = np.empty(2)
    _ssim_means(filt, (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, out)
    return [float(out[0]), float(out[1])]


def _ssim_stats(f, srcs):
    """Local means, variances and covariances of SSIM(F, S) for each S in ``srcs`` with
    skimage 0.19's defaults on float32 input (7×7 uniform window, 'reflect' borders, then a
    crop of 3 pixels per side, sample covariance, float32 arithmetic): the cddfuse convention,
    whose reference values were made with skimage's own float32 filter, which this keeps."""
    n = len(srcs)
    dtype = np.float32
    win = 7
    pad = (win - 1) // 2
    stack = _scratch("ssim_u_in", (2 + 3 * n, *f.shape), dtype)
    stack[0] = f
    for i, src in enumerate(srcs):
        stack[1 + i] = src
    np.multiply(stack[0], stack[0], out=stack[1 + n])
    np.multiply(stack[1 : 1 + n], stack[1 : 1 + n], out=stack[2 + n : 2 + 2 * n])
    np.multiply(stack[0], stack[1 : 1 + n], out=stack[2 + 2 * n :])
    filt = _scratch("ssim_u", stack.shape, dtype)
    ndimage.uniform_filter(stack, size=(1, win, win), output=filt, mode="reflect")
    filt = filt[:, pad:-pad, pad:-pad]
    uf, us = filt[0], filt[1 : 1 + n]
    uff, uss, ufs = filt[1 + n], filt[2 + n : 2 + 2 * n], filt[2 + 2 * n :]
    cov_norm = win * win / (win * win - 1)  # sample covariance
    tmp = _scratch("ssim_u_tmp", us.shape, dtype)
    np.multiply(uf, uf, out=tmp[0])
    np.subtract(uff, tmp[0], out=uff)
    uff *= cov_norm  # σ_F² = cov_norm (E[F²] − μ_F²), in place
    np.multiply(us, us, out=tmp)
    np.subtract(uss, tmp, out=uss)
    uss *= cov_norm
    np.multiply(uf, us, out=tmp)
    np.subtract(ufs, tmp, out=ufs)
    ufs *= cov_norm
    return uf, us, uff, uss, ufs


def _ssim_from_stats(stats, data_range) -> list[float]:
    """The mean SSIM map of each source from ``_ssim_stats`` (the cddfuse convention):
    ``((2 μ_F μ_S + C1)(2 σ_FS + C2)) / ((μ_F² + μ_S² + C1)(σ_F² + σ_S² + C2))``, evaluated in
    the statistics' dtype in the reference's order, in reused scratch arrays."""
    uf, us, vf, vs, vfs = stats
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    dt = us.dtype
    top = _scratch("ssim_top", us.shape, dt)
    bottom = _scratch("ssim_bottom", us.shape, dt)
    tmp = _scratch("ssim_tmp", us.shape, dt)
    np.multiply(2, uf, out=tmp[0])
    np.multiply(tmp[0], us, out=top)
    top += c1  # 2 μ_F μ_S + C1
    np.multiply(2, vfs, out=tmp)
    tmp += c2
    top *= tmp
    np.multiply(uf, uf, out=tmp[0])
    np.multiply(us, us, out=bottom)
    np.add(tmp[0], bottom, out=bottom)
    bottom += c1  # μ_F² + μ_S² + C1
    np.add(vf, vs, out=tmp)
    tmp += c2
    bottom *= tmp
    top /= bottom
    return [float(m.mean(dtype=np.float64)) for m in top]
