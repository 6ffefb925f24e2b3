"""The arithmetic of SSIM (local statistics and the per-source index) for
:func:`fuse4seg.metrics.fusion.ssim`, in its two windowings (Gaussian 11×11 σ 1.5, or uniform)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fuse4seg.metrics.kernels import (
    _gaussian_taps,
    _scratch,
    _source_moments,
    _valid_filter,
)


def _ssim_stats(f, srcs, *, gaussian, sample_cov, dtype, cache=None):
    """Local means, variances and covariances of SSIM(F, S) for each S in ``srcs``, on the
    pixels the evaluators average over (those (window − 1) / 2 or more from the border).

    Follows Wang et al. (2004) as skimage implements it: a window filter (uniform ``size 7``
    or Gaussian ``σ 1.5, truncate 3.5``), 'reflect' borders, then a crop of (window − 1) / 2
    pixels per side. The crop removes exactly the pixels whose window reaches the border, so
    the Gaussian case is a 'valid' filtering (the banded products of :func:`_valid_filter`,
    float64) of the moment stack VIF filters too (:func:`_source_moments`, two sources); the
    uniform case keeps skimage's own float32 filter, as the reference values were made with
    it."""
    n = len(srcs)
    if gaussian:  # filter [A, B, F, A², B², F², AF, BF] (float64, reused scratch arrays)
        if n != 2:
            raise ValueError("the Gaussian SSIM statistics take two sources")
        taps = _gaussian_taps(1.5, 3.5)
        stack = _source_moments(f, srcs[0], srcs[1], cache)
        filt = _valid_filter(stack, taps, name="ssim_m")
        uf, us = filt[n], filt[:n]
        vf, vs, vfs = filt[2 * n + 1], filt[n + 1 : 2 * n + 1], filt[2 * n + 2 :]
        tmp = _scratch("ssim_tmp", us.shape)
        np.multiply(uf, uf, out=tmp[0])
        np.subtract(vf, tmp[0], out=vf)  # population covariances, in place
        np.multiply(us, us, out=tmp)
        np.subtract(vs, tmp, out=vs)
        np.multiply(uf, us, out=tmp)
        np.subtract(vfs, tmp, out=vfs)
        return uf, us, vf, vs, vfs
    # skimage 0.19's default on float32 input: 7×7 uniform window, float32 arithmetic
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
    cov_norm = win * win / (win * win - 1) if sample_cov else 1.0
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
    """The mean SSIM map of each source from :func:`_ssim_stats`:
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
