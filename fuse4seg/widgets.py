"""Views of a case: a static panel (T1ce, FLAIR, labels) and an ipywidgets slice viewer.

Arrays are NIfTI-ordered ``(X, Y, Z)``; an axial slice ``[:, :, z]`` is shown rotated by 90° so
that anterior is up, as radiology viewers show BraTS. Label colours follow the BraTS
convention of the paper's figures: NCR red, ED green, ET yellow. Explained in chapter 1.
"""

from __future__ import annotations

import numpy as np

from fuse4seg.data.labels import CANONICAL_NAMES
from fuse4seg.plotting import LABEL_COLOURS, label_legend, orient


def _view(slice2d: np.ndarray) -> np.ndarray:
    return orient(slice2d)


def label_rgba(seg2d: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """An RGBA overlay ``(H, W, 4)`` of a canonical label slice (transparent background)."""
    seg2d = np.asarray(seg2d)
    rgba = np.zeros(seg2d.shape + (4,), dtype=np.float32)
    for label, colour in LABEL_COLOURS.items():
        rgba[seg2d == label] = (*colour, opacity)
    return rgba


def tumour_slice(seg: np.ndarray) -> int:
    """The axial index with the most tumour voxels (the middle slice if there is none)."""
    per_slice = (np.asarray(seg) > 0).reshape(-1, seg.shape[2]).sum(axis=0)
    return int(per_slice.argmax()) if per_slice.any() else seg.shape[2] // 2


def case_panel(t1ce, flair, seg, z: int | None = None, title: str = "", axes=None):
    """T1ce, FLAIR, labels and the overlay of one axial slice, side by side.

    Args:
        t1ce, flair: ``(X, Y, Z)`` volumes (raw or normalised).
        seg: ``(X, Y, Z)`` canonical labels or ``None``.
        z: axial index (default: the slice with most tumour).
    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    z = tumour_slice(seg) if (z is None and seg is not None) else (z or t1ce.shape[2] // 2)
    n = 4 if seg is not None else 2
    if axes is None:
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
    else:
        fig = axes[0].figure
    axes[0].imshow(_view(t1ce[:, :, z]), cmap="gray")
    axes[0].set_title("T1ce (x1)")
    axes[1].imshow(_view(flair[:, :, z]), cmap="gray")
    axes[1].set_title("FLAIR (x2)")
    if seg is not None:
        axes[2].imshow(_view(label_rgba(seg[:, :, z], 1.0)))
        axes[2].set_facecolor("black")
        axes[2].set_title("labels")
        axes[3].imshow(_view(flair[:, :, z]), cmap="gray")
        axes[3].imshow(_view(label_rgba(seg[:, :, z], 0.45)))
        axes[3].set_title("FLAIR + labels")
        label_legend(axes[3], loc="lower right", fontsize=7, framealpha=0.6)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} axial slice {z}".strip())
    fig.tight_layout()
    return fig


def slice_viewer(t1ce, flair, seg=None, title: str = ""):
    """An interactive viewer: axial slider, overlay toggle and overlay opacity.

    Returns an ``ipywidgets.VBox``; display it in a notebook. In a static page (the rendered
    book) the widget state of the initial slice is embedded.

    The figure is an ``ipywidgets.Image`` whose PNG bytes are redrawn on every change, not
    plots printed into an ``ipywidgets.Output``: a headless executor (nbclient, hence papermill
    and nbval) mimics the Output widget by sending a ``comm_msg`` back to the kernel on the
    shell channel for every output captured during the cell, and that traffic sometimes left
    the cell waiting forever with the kernel idle (four times in this project's builds;
    nbclient issue #312 reports the same with widget cells). An Image widget only sends state
    from the kernel, so nothing is sent back while the cell runs.
    """
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    z0 = tumour_slice(seg) if seg is not None else t1ce.shape[2] // 2
    slider = widgets.IntSlider(value=z0, min=0, max=t1ce.shape[2] - 1, description="axial z")
    overlay = widgets.Checkbox(value=seg is not None, description="label overlay",
                               disabled=seg is None)
    opacity = widgets.FloatSlider(value=0.45, min=0.0, max=1.0, step=0.05,
                                  description="opacity")
    image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))

    def draw(*_):
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        z = slider.value
        for ax, vol, name in ((axes[0], t1ce, "T1ce"), (axes[1], flair, "FLAIR")):
            ax.imshow(_view(vol[:, :, z]), cmap="gray")
            if overlay.value and seg is not None:
                ax.imshow(_view(label_rgba(seg[:, :, z], opacity.value)))
            ax.set_title(f"{name}, z = {z}")
            ax.axis("off")
        fig.suptitle(title)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        image.value = png.getvalue()

    for w in (slider, overlay, opacity):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([slider, overlay, opacity]), image])


def region_histograms(volumes: dict, seg, brain_mask, ax=None, bins: int = 50):
    """Intensity histograms per canonical region (healthy brain, NCR, ED, ET) per modality.

    Args:
        volumes: ``{"T1ce": vol, "FLAIR": vol}`` normalised to [0, 1].
        seg, brain_mask: canonical labels and the brain mask, same shape.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(1, len(volumes), figsize=(4.2 * len(volumes), 3))
    ax = np.atleast_1d(ax)
    regions = {"healthy brain": (seg == 0) & brain_mask}
    regions.update({CANONICAL_NAMES[k]: seg == k for k in (1, 2, 3)})
    colours = {"healthy brain": (0.5, 0.5, 0.5), **{CANONICAL_NAMES[k]: c
                                                     for k, c in LABEL_COLOURS.items()}}
    for a, (name, vol) in zip(ax, volumes.items(), strict=False):
        for region, mask in regions.items():
            if mask.any():
                a.hist(vol[mask], bins=bins, range=(0, 1), density=True, histtype="step",
                       color=colours[region], label=region, linewidth=1.5)
        a.set_title(name)
        a.set_xlabel("normalised intensity")
    ax[0].set_ylabel("density")
    ax[-1].legend(fontsize=8)
    return ax[0].figure
