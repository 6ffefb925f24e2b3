"""Classical fusion rules, the reference points of Table 2 beside the learnt leader (chapter 5).

- ``average``: ``(A + B) / 2``, the paper's x_avg.
- ``max``: the pixel-wise maximum.
- ``concat``: ``[A, B]`` stacked as channels (the direct multi-channel input; no fused image).
- ``dwt``: a multi-scale rule in the discrete-wavelet domain (Li, Manjunath & Mitra, 1995):
  decompose both sources with PyWavelets' ``wavedec2``, average the coarsest approximation,
  keep at every detail position the coefficient of larger magnitude ("max-abs"), invert with
  ``waverec2``. Defaults (``db2``, 3 levels, ``symmetric`` extension) are a common choice in the
  fusion literature; the paper does not name one. The transform is PyWavelets', not ours.

:data:`RULES` holds each rule once, for numpy arrays and torch tensors alike: the trainer's
baselines (``average``, ``max``, ``direct2ch``) and Fuse4Seg's warm-up prior x_avg call the same
functions as chapter 5's Table 2 rows. The image wrappers below (:data:`BASELINES`) take two
grey images of the same shape on one scale (0..255 or [0, 1]) and returns
a float64 image on that scale, clipped to ``[min, max]`` of the two inputs (the DWT can ring
slightly outside). Colour sources are fused on Y; ``fuse4seg.data.pairs.colorize`` puts the
chroma back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "BASELINES",
    "RULES",
    "RULE_LABELS",
    "average_rule",
    "concat_rule",
    "fuse_average",
    "fuse_baseline",
    "fuse_dwt",
    "fuse_max",
    "max_rule",
]


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def average_rule(a, b):
    """x_avg = (a + b) / 2 (Algorithm 1, line 2), for arrays or tensors of one shape."""
    return 0.5 * (a + b)


def max_rule(a, b):
    """max(a, b) per element, for arrays or tensors."""
    if _is_torch(a):
        import torch

        return torch.maximum(a, b)
    return np.maximum(a, b)


def concat_rule(a, b):
    """``[a, b]`` along the channel axis: ``(B, 1, H, W)`` x2 -> ``(B, 2, H, W)``."""
    if _is_torch(a):
        import torch

        return torch.cat([a, b], dim=1)
    return np.concatenate([a, b], axis=1)


RULES: dict[str, Callable] = {"average": average_rule, "max": max_rule, "concat": concat_rule}
"""The fixed rules by name, each defined once (numpy or torch in, the same type out)."""

RULE_LABELS = {"average": "x_avg", "max": "max", "concat": "[x1, x2]"}
"""How each rule's output is named in the paper's terms (validation records, chapters)."""


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"fusion rule: need two 2-D images of one shape, got {a.shape} and {b.shape}"
        )
    return a, b


def fuse_average(a, b) -> np.ndarray:
    """``(A + B) / 2`` as float64 ``(H, W)``."""
    return average_rule(*_pair(a, b))


def fuse_max(a, b) -> np.ndarray:
    """``max(A, B)`` per pixel, float64 ``(H, W)``."""
    return max_rule(*_pair(a, b))


def fuse_dwt(a, b, wavelet: str = "db2", levels: int = 3, mode: str = "symmetric") -> np.ndarray:
    """DWT fusion: mean of the approximations, max-abs choice of every detail coefficient.

    Args:
        a, b: ``(H, W)`` images on one scale.
        wavelet: a PyWavelets wavelet name (``pywt.wavelist(kind="discrete")``).
        levels: decomposition levels (reduced to PyWavelets' maximum for small images).
        mode: signal extension mode of ``pywt.wavedec2``.

    Returns:
        float64 ``(H, W)``, clipped to the inputs' joint range.

    Raises:
        ValueError: shapes differ; unknown wavelet; ``levels < 1``.
    """
    import pywt

    a, b = _pair(a, b)
    if levels < 1:
        raise ValueError(f"fuse_dwt: levels must be >= 1, got {levels}")
    try:
        w = pywt.Wavelet(wavelet)
    except ValueError as exc:
        raise ValueError(f"fuse_dwt: unknown wavelet {wavelet!r} ({exc})") from exc
    levels = max(1, min(levels, pywt.dwtn_max_level(a.shape, w)))
    ca = pywt.wavedec2(a, w, mode=mode, level=levels)
    cb = pywt.wavedec2(b, w, mode=mode, level=levels)
    fused = [average_rule(ca[0], cb[0])]  # coarsest approximation: average
    for da, db in zip(ca[1:], cb[1:], strict=True):  # (cH, cV, cD) per level: max-abs
        fused.append(
            tuple(np.where(np.abs(x) >= np.abs(y), x, y) for x, y in zip(da, db, strict=True))
        )
    out = pywt.waverec2(fused, w, mode=mode)[: a.shape[0], : a.shape[1]]
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    return np.clip(out, lo, hi)


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "average": fuse_average,
    "max": fuse_max,
    "dwt": fuse_dwt,
}
"""The classical rules by name (chapter 5's Table 2 rows)."""


def fuse_baseline(name: str, a, b) -> np.ndarray:
    """Apply the rule ``name`` (a key of :data:`BASELINES`) to ``a`` and ``b``.

    Raises:
        ValueError: unknown name (the valid ones are listed).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown fusion rule {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name](a, b)
