"""Fusion pairs: layouts, name/size matching, the reference grey reader, colour round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fuse4seg.data.pairs import (
    HARVARD_KINDS,
    colorize,
    find_gfp_pairs,
    find_harvard_pairs,
    find_pairs,
    load_pair,
    read_grey,
    read_image,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture()
def tiny_harvard(tmp_path):
    """A Harvard-layout folder with two PET-MRI test pairs (grey MRI, colour PET)."""
    rng = np.random.default_rng(1)
    for name in ("b2", "a1"):
        _write(
            tmp_path / "PET-MRI/test/MRI" / f"{name}.png",
            rng.integers(0, 256, (8, 8), dtype=np.uint8),
        )
        _write(
            tmp_path / "PET-MRI/test/PET" / f"{name}.png",
            rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        )
    return tmp_path


# ----------------------------------------------------------------- colour


def test_ycbcr_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3)).astype(np.float64)
    assert np.allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-9)
    ycc = rgb_to_ycbcr(np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], float))
    assert np.allclose(ycc[0, 0], [255, 128, 128]) and np.allclose(ycc[0, 1], [0, 128, 128])
    assert np.allclose(
        ycc[0, 2], [0.299 * 255, 128 - 0.299 * 255 / 1.772, 128 + 0.701 * 255 / 1.402]
    )


def test_colour_split_and_colorize_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    src = read_image(_write(tmp_path / "c.png", rgb))
    assert src.is_colour and src.y.dtype == np.uint8 and src.cbcr.shape == (12, 10, 2)
    back = colorize(src.y, src.cbcr)  # Y was rounded to uint8: within 1 grey level per channel
    assert back.dtype == np.uint8 and back.shape == rgb.shape
    assert np.abs(back.astype(int) - rgb).max() <= 1
    # a grey result is repeated over three channels
    assert colorize(src.y, None).tolist() == np.repeat(src.y[..., None], 3, -1).tolist()
    with pytest.raises(ValueError, match="chroma shape"):
        colorize(src.y[:5], src.cbcr)


def test_read_grey_is_float32_luma_rounded_half_even(tmp_path):
    # 0.299*1 + 0.587*1 + 0.114*0 = 0.886 -> 1; R=G=B=v stays v; (3, 0, 0) -> 0.897 -> 1;
    # (0, 0, 250) -> exactly 28.5 in float32 -> 28, to even (half up would give 29)
    rgb = np.array([[[1, 1, 0], [200, 200, 200], [3, 0, 0], [0, 0, 255], [0, 0, 250]]],
                   np.uint8)
    y = read_grey(_write(tmp_path / "x.png", rgb))
    lum = (
        rgb[..., 2].astype(np.float32) * np.float32(0.114)
        + rgb[..., 1].astype(np.float32) * np.float32(0.587)
        + rgb[..., 0].astype(np.float32) * np.float32(0.299)
    )
    assert y.dtype == np.uint8 and y.tolist() == np.round(lum).astype(np.uint8).tolist()
    assert y[0, 1] == 200 and y[0, 3] == 29  # 0.114 * 255 = 29.07
    assert lum[0, 4] == 28.5 and y[0, 4] == 28
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert read_grey(_write(tmp_path / "g.png", grey)).tolist() == grey.tolist()
    # an RGB file with three equal channels is grey: no chroma
    assert read_image(_write(tmp_path / "g3.png", np.repeat(grey[..., None], 3, -1))).cbcr is None


def test_read_grey_matches_opencv_float_path(harvard_dir):
    """Cross-check with the reference's own reader: cv2.cvtColor on float32 BGR, np.round."""
    import cv2
    for kind in ("PET-MRI", "SPECT-MRI"):
        for p in find_harvard_pairs(harvard_dir, kind, "test")[:3]:
            ref = np.round(
                cv2.cvtColor(cv2.imread(str(p.b)).astype("float32"), cv2.COLOR_BGR2GRAY)
            ).astype(np.uint8)
            assert np.array_equal(read_grey(p.b), ref), p.b
            a_ref = cv2.imread(str(p.a), cv2.IMREAD_GRAYSCALE)
            assert np.array_equal(read_grey(p.a), a_ref), p.a


# ----------------------------------------------------------------- layouts


def test_harvard_layout_on_synthetic_folder(tiny_harvard):
    pairs = find_harvard_pairs(tiny_harvard, "PET-MRI", "test")
    assert [p.name for p in pairs] == ["a1", "b2"]  # sorted
    assert pairs[0].a.parent.name == "MRI" and pairs[0].b.parent.name == "PET"
    # the kind folder itself is accepted too
    assert find_harvard_pairs(tiny_harvard / "PET-MRI", "PET-MRI", "test") == pairs
    pair = load_pair(pairs[0])
    assert pair.a.shape == pair.b.shape == (8, 8) and pair.b_cbcr is not None
    assert pair.chroma is pair.b_cbcr and pair.a_cbcr is None


def test_unmatched_names_are_all_named(tiny_harvard):
    (tiny_harvard / "PET-MRI/test/PET/a1.png").rename(tiny_harvard / "PET-MRI/test/PET/zz.png")
    with pytest.raises(ValueError, match=r"a1\.png") as err:
        find_harvard_pairs(tiny_harvard, "PET-MRI", "test")
    assert "zz.png" in str(err.value) and "unmatched" in str(err.value)


def test_size_mismatch_names_both_files(tiny_harvard):
    _write(tiny_harvard / "PET-MRI/test/PET/a1.png", np.zeros((9, 8, 3), np.uint8))
    pairs = find_harvard_pairs(tiny_harvard, "PET-MRI", "test")
    with pytest.raises(ValueError, match="size mismatch") as err:
        load_pair(pairs[0])
    assert "MRI/a1.png" in str(err.value) and "PET/a1.png" in str(err.value)


def test_bad_arguments_and_missing_folders(tmp_path, tiny_harvard):
    with pytest.raises(ValueError, match="kind"):
        find_harvard_pairs(tiny_harvard, "XX-MRI")
    with pytest.raises(ValueError, match="split"):
        find_harvard_pairs(tiny_harvard, "PET-MRI", "val")
    with pytest.raises(FileNotFoundError, match="SPECT-MRI"):
        find_harvard_pairs(tiny_harvard, "SPECT-MRI")
    with pytest.raises(FileNotFoundError, match="train"):
        find_harvard_pairs(tiny_harvard, "PET-MRI", "train")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_grey(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        read_grey(tmp_path / "bad.png")
    # predict's fused.nii.gz given to `metrics` (a review): named as a volume, with the way on
    import nibabel as nib

    volume = tmp_path / "fused.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), volume)
    with pytest.raises(ValueError, match=r"fused.nii.gz: a NIfTI volume; fusion metrics read "
                                         r"2-D images .* as PNG files first"):
        read_grey(volume)
    # a PNG cut short: Pillow's "image file is truncated" names no file; ours does
    rng = np.random.default_rng(2)
    whole = _write(tmp_path / "whole.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.png: unreadable or truncated image"):
        read_grey(cut)


def test_real_harvard_pairs(harvard_dir):
    for kind, mod in HARVARD_KINDS.items():
        pairs = find_pairs(harvard_dir, kind, "test")
        assert len(pairs) == 24 and all(p.b.parent.name == mod for p in pairs)
    pair = load_pair(find_harvard_pairs(harvard_dir, "SPECT-MRI", "test")[0])
    assert pair.a.shape == (256, 256) and pair.b_cbcr is not None
    rgb = np.asarray(Image.open(pair.paths.b).convert("RGB"))
    assert np.abs(colorize(pair.b, pair.b_cbcr).astype(int) - rgb).max() <= 1
    ct = load_pair(find_harvard_pairs(harvard_dir, "CT-MRI", "test")[0])
    assert ct.b_cbcr is None and ct.chroma is None


def test_real_gfp_pairs(gfp_dir):
    pairs = find_gfp_pairs(gfp_dir)
    assert len(pairs) == 6 and pairs[0].kind == "GFP-PC"
    assert pairs[0].a.parent.name == "PC" and pairs[0].b.parent.name == "GFP"
    pair = load_pair(pairs[0])
    assert pair.a.shape == (358, 358) and pair.b_cbcr is not None
    assert find_pairs(gfp_dir, "GFP-PC") == pairs


def test_opencv_imread_grayscale_differs_as_the_reference_says(shared_data):
    """The reference file counts the pixels where cv2.IMREAD_GRAYSCALE (libpng fixed point)
    differs from the float32 luma we read; the appendix quotes these counts."""
    import json

    import cv2
    path = shared_data.parent / "reference" / "fusion_metrics_reference.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    for key, entry in json.loads(path.read_text())["pairs"].items():
        b_path = shared_data / entry["inputs"]["B_path"].split("shared/data/", 1)[1]
        ours = read_grey(b_path).astype(int)
        libpng = cv2.imread(str(b_path), cv2.IMREAD_GRAYSCALE).astype(int)
        assert np.abs(ours - libpng).max() <= 1, key
        expected = entry["inputs"]["pixels_B_differs_if_cv2_IMREAD_GRAYSCALE_instead"]
        assert int((ours != libpng).sum()) == expected, key
