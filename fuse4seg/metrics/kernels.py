"""The numerical kernels behind the fusion metrics (:mod:`fuse4seg.metrics.fusion`).

- ``_valid_filter``: separable 'valid' filtering of a stack of images by direct loops
  compiled with numba (the Gaussian windows of SSIM and VIF), with ``_moments_stack``
  building the local-moment stacks both metrics filter and ``_source_moments`` the one
  they share;
- ``_sobel``: the 3×3 Sobel responses of Q^AB/F with a zero border;
- ``_scratch`` / ``_bool_scratch``: per-thread work arrays kept between calls, so a
  metric call does not allocate some tens of MB of fresh arrays (about 60 MB for 256² images).

Private to the metrics package; the values they produce are checked against the reference file
by ``tests/test_fusion_metrics.py``.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian kernel (radius ``int(truncate · σ + 0.5)``), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


_SCRATCH = threading.local()
_SCRATCH_BYTES = 256 << 20  # per thread; about 60 MB for 256² images


def _scratch(name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """A work array for ``name``, ``shape`` and ``dtype``, reused across calls in this thread.

    Large fresh arrays cost page faults on every call (the allocator hands multi-megabyte
    blocks back to the system on free); reusing the intermediates of the metrics removes most
    of that. Each (name, shape, dtype) has its own array, so nested uses do not meet; a caller
    must be done with an array before asking for the same name and shape again. The least
    recently used arrays are dropped beyond ``_SCRATCH_BYTES``."""
    store = _SCRATCH.__dict__.setdefault("arrays", {})
    key = (name, tuple(shape), np.dtype(dtype).str)
    arr = store.pop(key, None)
    if arr is None:
        arr = np.empty(shape, dtype)
        if arr.nbytes > _SCRATCH_BYTES // 4:
            return arr
        total = sum(x.nbytes for x in store.values()) + arr.nbytes
        while store and total > _SCRATCH_BYTES:
            total -= store.pop(next(iter(store))).nbytes
    store[key] = arr  # most recently used last
    return arr


def _bool_scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A reused bool work array (a view of a float64 scratch array's bytes)."""
    size = math.prod(shape)
    return _scratch(name, (-(-size // 8),)).view(np.bool_)[:size].reshape(shape)


def _compiled(fn):
    """``fn`` compiled by numba (``nopython``, ``cache=True``, multiply-adds fused) on its
    first call. ``import numba`` takes about 0.4 s, so it waits until a metric needs a kernel:
    importing the metrics, or scoring only EN, MI and the like, does not pay it. The cache in
    ``__pycache__`` keeps a fresh install's one-off compilation (a few seconds for all the
    kernels) from being repeated by later processes."""
    jitted = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal jitted
        if jitted is None:
            import numba

            jitted = numba.njit(cache=True, nogil=True, fastmath={"contract"})(fn)
        return jitted(*args)

    return call


@_compiled
def _filter_into(stack, w, step, across, out):  # pragma: no cover - compiled
    """The loops of ``_valid_filter``: per image, the pass along W into ``across`` (H, m),
    then the pass along H into ``out[s]``; symmetric taps, so each pair of mirrored taps costs
    one multiplication; every inner loop runs along a row (contiguous, vectorised)."""
    num, h = stack.shape[0], stack.shape[1]
    n = w.shape[0]
    half = n // 2
    centre = w[half]
    m, m2 = out.shape[2], out.shape[1]
    for s in range(num):
        for i in range(h):
            row, dst = stack[s, i], across[i]
            if step == 1:  # unit stride: the loops vectorise
                for j in range(m):
                    dst[j] = centre * row[j + half]
                for k in range(half):
                    wk, near, far = w[k], row[k:], row[n - 1 - k :]
                    for j in range(m):
                        dst[j] += wk * (near[j] + far[j])
            else:
                for j in range(m):
                    dst[j] = centre * row[j * step + half]
                for k in range(half):
                    wk, far = w[k], n - 1 - k
                    for j in range(m):
                        dst[j] += wk * (row[j * step + k] + row[j * step + far])
        for i in range(m2):
            top = i * step
            dst, mid = out[s, i], across[top + half]
            for j in range(m):
                dst[j] = centre * mid[j]
            for k in range(half):
                wk, r1, r2 = w[k], across[top + k], across[top + n - 1 - k]
                for j in range(m):
                    dst[j] += wk * (r1[j] + r2[j])


def _valid_filter(stack: np.ndarray, w: np.ndarray, step: int = 1, name: str = "") -> np.ndarray:
    """'valid' 2-D filtering of a stack ``(N, H, W)`` with the separable window ``w ⊗ w``,
    keeping every ``step``-th output: ``(N, H, W) -> (N, (H − n) // step + 1, ...)``. The
    window is symmetric (every window here is), so correlation equals the evaluators'
    convolution.

    Two 1-D passes of direct loops, compiled by numba (``_filter_into``): a mirrored pair
    of taps costs one multiplication and only the kept outputs are computed. float64
    throughout: the local variances are differences of such sums, and float32 filtering moves
    VIF by 2e-5 relative on the Harvard pairs (SSIM by 7e-7), past the 1e-6 the metrics keep
    (issue 9). With a ``name`` the result is a reused scratch array (``_scratch``): use it
    before the next call with the same name and shape.

    Raises:
        ValueError: ``w`` is not symmetric or has an even length.
    """
    w = np.ascontiguousarray(w, dtype=np.float64)
    n = len(w)
    if n % 2 == 0 or not np.array_equal(w, w[::-1]):
        raise ValueError(f"_valid_filter: the window must be symmetric with odd length, got {w}")
    num, h, wd = stack.shape
    stack = np.ascontiguousarray(stack, dtype=np.float64)
    m, m2 = (wd - n) // step + 1, (h - n) // step + 1
    across = _scratch("across", (h, m))
    out = _scratch(name, (num, m2, m)) if name else np.empty((num, m2, m))
    _filter_into(stack, w, step, across, out)
    return out


def _moments_stack(name: str, refs: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """``[refs..., dist, refs², dist², refs·dist]`` in a reused scratch array."""
    k = len(refs)
    out = _scratch(name, (3 * k + 2, *dist.shape))
    out[:k] = refs
    out[k] = dist
    np.multiply(refs, refs, out=out[k + 1 : 2 * k + 1])
    np.multiply(dist, dist, out=out[2 * k + 1])
    np.multiply(refs, dist, out=out[2 * k + 2 :])
    return out


def _source_moments(f: np.ndarray, a: np.ndarray, b: np.ndarray, cache=None) -> np.ndarray:
    """The full-resolution moment stack ``[A, B, F, A², B², F², AF, BF]`` ``(8, H, W)`` that
    the standard SSIM and VIF's first scale both filter, built once per
    :func:`~fuse4seg.metrics.fusion.fusion_metrics` call (``cache``)."""
    if cache is not None and "moments" in cache:
        return cache["moments"]
    refs = _scratch("moments_refs", (2, *f.shape))
    refs[0], refs[1] = a, b
    out = _moments_stack("moments", refs, f)
    if cache is not None:
        cache["moments"] = out
    return out


def _sobel(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel responses of a stack ``(N, H, W)`` with zero padding ('same' size).

    Matches ``scipy.signal.convolve2d(img, k, mode='same')`` with the evaluators' kernels
    ``x = [[-1,0,1],[-2,0,2],[-1,0,1]]`` and ``y = [[1,2,1],[0,0,0],[-1,-2,-1]]`` (true
    convolution, i.e. both kernels flipped: the responses are ``-correlate``; their ratio and
    magnitude, all Q^AB/F uses, do not change, but we keep the sign anyway). The results are
    reused scratch arrays (``_scratch``).
    """
    n, h, w = images.shape
    p = _scratch("sobel_pad", (n, h + 2, w + 2))  # zero border, the images inside
    p[:, 0], p[:, -1], p[:, :, 0], p[:, :, -1] = 0.0, 0.0, 0.0, 0.0
    p[:, 1:-1, 1:-1] = images
    # Both kernels are separable: x = [1, 2, 1]^T ⊗ [-1, 0, 1], y = [1, 0, -1]^T ⊗ [1, 2, 1].
    # Convolution flips them, so out(i, j) = Σ k(u, v) p(i + 2 - u, j + 2 - v).
    smooth_v = _scratch("sobel_v", (n, h, w + 2))  # p[:, :-2] + 2 p[:, 1:-1] + p[:, 2:]
    np.multiply(p[:, 1:-1], 2, out=smooth_v)
    np.add(p[:, :-2], smooth_v, out=smooth_v)
    smooth_v += p[:, 2:]
    smooth_h = _scratch("sobel_h", (n, h + 2, w))  # p[:, :, :-2] + 2 p[:, :, 1:-1] + ...
    np.multiply(p[:, :, 1:-1], 2, out=smooth_h)
    np.add(p[:, :, :-2], smooth_h, out=smooth_h)
    smooth_h += p[:, :, 2:]
    sx = np.subtract(smooth_v[:, :, :-2], smooth_v[:, :, 2:], out=_scratch("sobel_x", (n, h, w)))
    sy = np.subtract(smooth_h[:, 2:], smooth_h[:, :-2], out=_scratch("sobel_y", (n, h, w)))
    return sx, sy
