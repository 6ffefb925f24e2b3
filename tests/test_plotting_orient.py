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
    png = np.zeros((5, 7, 3))
    assert orient(png, "image") is not None and orient(png, "image").shape == (5, 7, 3)
    with pytest.raises(ValueError, match="orientation"):
        orient(x, "radiological")
