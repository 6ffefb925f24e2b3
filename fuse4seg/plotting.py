"""Shared plotting helpers for the book: one image display, label overlays, galleries, curves.

**Orientation.** A BraTS/NIfTI axial slice is indexed ``(X, Y)`` (left-right, posterior-
anterior); shown as a matrix it lies on its side. :func:`orient` rotates it by 90° so anterior is
up, and every helper here that shows a slice (``show``, ``overlay_labels``, ``show_slices``, the
chapter 1 viewer) goes through it, so the same slice looks the same in every chapter.
Photographs and PNG pairs (chapter 5) are already in image order: ``orientation="image"``.

Kept general on purpose (any chapter may use them); matplotlib is imported lazily so the
package imports without a display. Label colours follow the BraTS convention used in the
paper's figures: NCR red, ED green, ET yellow. First used in chapter 1
(``book/01_data.md``: ``show``, ``overlay_labels``, ``label_legend``); the training curves in
chapter 4 (``plot_curves``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "LABEL_COLOURS",
    "label_legend",
    "orient",
    "overlay_labels",
    "plot_curves",
    "show",
    "show_slices",
]

LABEL_COLOURS: dict[int, tuple[float, float, float]] = {
    1: (0.90, 0.10, 0.10),  # NCR, red
    2: (0.10, 0.75, 0.20),  # ED, green
    3: (1.00, 0.85, 0.00),  # ET, yellow
}
"""RGB colour of each canonical tumour label."""


def label_legend(target, **kwargs: Any):
    """Add the legend of the tumour labels' colours (NCR red, ED green, ET yellow) to a
    matplotlib axes or figure, so that a panel of labels can be read without chapter 1.

    Args:
        target: an axes or a figure (``target.legend`` is called).
        kwargs: passed to ``legend`` (``loc``, ``fontsize``, ``ncol``, ...).

    Returns:
        The legend.
    """
    from matplotlib.patches import Patch

    from fuse4seg.data.labels import CANONICAL_NAMES  # here: fuse4seg.data imports nibabel

    handles = [Patch(color=LABEL_COLOURS[k], label=CANONICAL_NAMES[k]) for k in LABEL_COLOURS]
    return target.legend(handles=handles, **kwargs)


def _as_2d(image: Any) -> np.ndarray:
    array = (
        image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    )
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image (after squeezing), got shape {array.shape}")
    return array


def orient(image: Any, orientation: str = "nifti") -> np.ndarray:
    """The display array of a slice: ``(X, Y)`` NIfTI slices (or an ``(X, Y, 3|4)`` RGB(A)
    rendering of one) rotated 90° (anterior up); ``orientation="image"`` leaves a photograph or
    PNG (``(H, W)`` or ``(H, W, 3)``) as it is."""
    if orientation == "image":
        return np.asarray(image)
    if orientation != "nifti":
        raise ValueError(f"orientation must be 'nifti' or 'image', got {orientation!r}")
    array = np.asarray(image) if not hasattr(image, "detach") else _as_2d(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4):  # an RGB(A) rendering of a slice
        return np.rot90(array, axes=(0, 1))
    return np.rot90(_as_2d(array))


def show(
    ax,
    image: Any,
    title: str | None = None,
    *,
    orientation: str = "nifti",
    box: tuple[int, int, int] | None = None,
    **kwargs: Any,
):
    """Show one image on ``ax`` in the book's orientation (:func:`orient`), without axes.

    Args:
        image: a 2-D array or tensor (``(1, H, W)`` is squeezed), or an RGB image with
            ``orientation="image"``.
        title: the panel title.
        box: ``(row, col, size)`` of a region (in display coordinates) to frame in yellow and
            magnify 2.5x in an inset in the lower right corner (chapter 5's Figure 5).
        kwargs: passed to ``imshow`` (``cmap``, ``vmin``, ``vmax``, ...).

    Returns:
        The axes.
    """
    img = orient(image, orientation)
    if img.ndim == 2:
        kwargs.setdefault("cmap", "gray")
    ax.imshow(img, **kwargs)
    if box is not None:
        import matplotlib.pyplot as plt

        y0, x0, size = box
        ax.add_patch(plt.Rectangle((x0, y0), size, size, fill=False, ec="yellow", lw=1))
        inset = ax.inset_axes([0.6, 0.0, 0.4, 0.4])
        inset.imshow(img[y0 : y0 + size, x0 : x0 + size], **kwargs)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def overlay_labels(
    image: Any,
    labels: Any,
    ax=None,
    alpha: float = 0.45,
    colours: Mapping[int, tuple[float, float, float]] = LABEL_COLOURS,
    title: str | None = None,
    orientation: str = "nifti",
    vmin: float | None = None,
    vmax: float | None = None,
):
    """Show a grey image with label colours blended on top (oriented by :func:`orient`).

    Args:
        image: ``(H, W)`` array or tensor (any range).
        labels: ``(H, W)`` integer labels (canonical: 1 NCR, 2 ED, 3 ET; 0 is transparent).
        ax: a matplotlib axes (default: a new figure).
        alpha: opacity of the label colours.
        colours: label → RGB.
        vmin, vmax: the grey range (values outside are clipped); ``None`` (each) = the
            image's own minimum or maximum. Give ``0, 1`` for intensities normalised to
            [0, 1], so that panels of several slices share one scale: with its own range a
            dim slice is stretched and looks brighter than its neighbours.

    Returns:
        The axes.

    Raises:
        ValueError: shapes that differ or are not 2-D.
    """
    import matplotlib.pyplot as plt

    img = orient(_as_2d(image), orientation).astype(np.float32)
    lab = orient(_as_2d(labels), orientation).astype(np.int64)
    if img.shape != lab.shape:
        raise ValueError(f"overlay_labels: image {img.shape} and labels {lab.shape} differ")
    lo = float(img.min()) if vmin is None else float(vmin)
    hi = float(img.max()) if vmax is None else float(vmax)
    grey = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, colour in colours.items():
        mask = lab == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_slices(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    cmap: str = "gray",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    size: float = 2.4,
    suptitle: str | None = None,
    labels: Sequence[Any | None] | None = None,
    orientation: str = "nifti",
):
    """A grid of 2-D images (one row unless ``ncols`` is given), oriented by :func:`orient`.

    Args:
        images: 2-D arrays or tensors (``(1, H, W)`` is squeezed).
        titles: one per image.
        ncols: images per row (default: all in one row).
        cmap, vmin, vmax: display range (``None`` = each image's own).
        size: inches per panel.
        labels: optional label map per image, drawn with :func:`overlay_labels`.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("show_slices: no images")
    ncols = ncols or n
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        title = titles[i] if titles is not None else None
        lab = labels[i] if labels is not None else None
        if lab is not None:
            overlay_labels(images[i], lab, ax=ax, title=title, orientation=orientation,
                           vmin=vmin, vmax=vmax)
            continue
        show(ax, images[i], title, orientation=orientation, cmap=cmap, vmin=vmin, vmax=vmax,
             interpolation="nearest")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def _get(row: Mapping[str, Any], key: str) -> float | None:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def plot_curves(
    rows: Iterable[Mapping[str, Any]],
    keys: Sequence[str],
    x: str = "epoch",
    ax=None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    shade: str | None = "stage",
):
    """Plot metrics rows (e.g. ``metrics.jsonl``) against ``x``.

    Args:
        rows: dicts; nested values are reached with dotted keys (``"val.mean_dice"``). Rows
            without a key are skipped for that curve.
        keys: the values to plot, one curve each.
        x: the x-axis key.
        labels: legend entries (default: the keys).
        shade: a key whose value changes mark phases (e.g. warm-up / rollout); each change is
            drawn as a dashed vertical line.

    Returns:
        The axes.
    """
    import matplotlib.pyplot as plt

    rows = list(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for i, key in enumerate(keys):
        pts = [(_get(r, x), _get(r, key)) for r in rows]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        if pts:
            xs, ys = zip(*pts, strict=False)
            ax.plot(xs, ys, marker="o", ms=3, label=labels[i] if labels else key)
    marks = 0
    if shade:
        for prev, row in zip(rows, rows[1:], strict=False):
            if prev.get(shade) != row.get(shade) and _get(row, x) is not None:
                ax.axvline(_get(row, x) - 0.5, ls="--", lw=0.8, color="grey")
                # named above the frame, where no data point can hide the name
                ax.annotate(str(row.get(shade)), xy=(_get(row, x) - 0.5, 1.0),
                            xycoords=ax.get_xaxis_transform(), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom",
                            fontsize=7, color="grey", annotation_clip=False)
                marks += 1
    ax.set_xlabel(x)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:  # raised over the stage names
        ax.set_title(title, fontsize=10, pad=13 if marks else 6)
    ax.legend(fontsize=8)
    return ax
