"""One orientation for every slice the book shows (fuse4seg.plotting.orient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuse4seg.plotting import orient


def test_nifti_slices_turn_anterior_up_and_images_stay():
    x = np.arange(6).reshape(2, 3)  # (X, Y)
    assert np.array_equal(orient(x), np.rot90(x))
    assert np.array_equal(orient(torch.from_numpy(x)[None]), np.rot90(x))  # (1, X, Y) squeezed
    rgba = np.zeros((2, 3, 4))
    rgba[0, 2] = 1.0
    assert orient(rgba).shape == (3, 2, 4) and orient(rgba)[0, 0, 0] == 1.0
    png = np.arange(105.0).reshape(5, 7, 3)  # an image file's rows are already upright
    assert np.array_equal(orient(png, "image"), png)
    with pytest.raises(ValueError, match="orientation"):
        orient(x, "radiological")


def test_the_slice_viewer_redraws_a_png_image_and_captures_no_output():
    import matplotlib

    matplotlib.use("Agg")
    import ipywidgets as widgets

    from fuse4seg.widgets import slice_viewer

    vol = np.random.default_rng(0).random((20, 24, 6)).astype(np.float32)
    seg = np.zeros(vol.shape, np.uint8)
    seg[5:9, 5:9, 4] = 2
    box = slice_viewer(vol, vol, seg, title="case")
    controls, image = box.children
    slider, overlay, opacity = controls.children
    # an Image widget, not an Output widget (whose captured outputs a headless executor
    # syncs back to the kernel mid-cell: the chapter-01 hang)
    assert isinstance(image, widgets.Image) and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert slider.value == 4  # the slice with the most tumour
    first = image.value
    slider.value = 1
    assert image.value != first and image.value[:4] == b"\x89PNG"
    assert not any(isinstance(w, widgets.Output) for w in (*box.children, *controls.children))


def test_the_label_legend_names_each_colour_by_the_canonical_label():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from fuse4seg.data.labels import CANONICAL_NAMES
    from fuse4seg.plotting import LABEL_COLOURS, label_legend

    fig, ax = plt.subplots()
    try:
        legend = label_legend(ax, loc="lower right")
        texts = [t.get_text() for t in legend.get_texts()]
        colours = [to_rgb(h.get_facecolor()) for h in legend.legend_handles]
    finally:
        plt.close(fig)
    assert texts == ["NCR", "ED", "ET"] == [CANONICAL_NAMES[k] for k in LABEL_COLOURS]
    assert colours == [pytest.approx(LABEL_COLOURS[k]) for k in (1, 2, 3)]


def test_overlay_labels_can_share_one_grey_scale_across_panels():
    """A review found chapter 1's tumour-free slices brighter than the FLAIR row above them:
    each overlay was stretched to its own min-max. ``vmin``/``vmax`` fix the scale (values
    outside are clipped); without them the image's own range is still used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fuse4seg.plotting import overlay_labels

    dim = np.full((4, 4), 0.2, np.float32)
    dim[0, 0] = 0.4  # the brightest pixel of a dim slice
    labels = np.zeros((4, 4), np.int64)

    def grey(**scale):
        fig, ax = plt.subplots()
        overlay_labels(dim, labels, ax=ax, orientation="image", **scale)
        shown = ax.get_images()[0].get_array()[..., 0]
        plt.close(fig)
        return np.asarray(shown)

    assert grey()[0, 0] == pytest.approx(1.0)  # own range: 0.4 shown as white
    fixed = grey(vmin=0, vmax=1)
    assert fixed[0, 0] == pytest.approx(0.4) and fixed[1, 1] == pytest.approx(0.2)
    assert grey(vmin=0, vmax=0.3)[0, 0] == pytest.approx(1.0)  # clipped, not above white
