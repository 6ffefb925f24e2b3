"""The fast `data prepare` path (read each file once, normalise the brain voxels only, cast in
memory order, optional worker processes) writes exactly the bytes of the plain formulas."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fuse4seg.config import get_config
from fuse4seg.data.labels import to_canonical
from fuse4seg.data.layouts import DataError, find_cases, load_case, load_volume, normalize_intensity
from fuse4seg.data.slices import (
    load_manifest,
    prepare_cache,
    preprocess_labels,
    preprocess_volume,
)


def _files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.npy"))}


def _expected(files, cfg) -> dict[str, np.ndarray]:
    """The arrays of one case by the plain formulas on whole float32 volumes."""
    t1ce = load_volume(files.paths["t1ce"])[0]
    flair = load_volume(files.paths["flair"])[0]
    if files.paths.get("mask") is not None:
        brain = load_volume(files.paths["mask"])[0] > 0.5
    else:
        brain = (t1ce != 0) | (flair != 0)
    seg = to_canonical(load_volume(files.paths["seg"])[0], files.scheme)
    x, y, _ = brain.shape
    fraction = brain.reshape(x * y, -1).mean(axis=0)
    keep = np.flatnonzero(fraction >= cfg.min_brain_fraction)[:: cfg.slice_stride]
    p = cfg.intensity_percentiles
    return {
        "t1ce": preprocess_volume(normalize_intensity(t1ce, brain, p)[:, :, keep], cfg).astype(
            np.float16
        ),
        "flair": preprocess_volume(normalize_intensity(flair, brain, p)[:, :, keep], cfg).astype(
            np.float16
        ),
        "seg": preprocess_labels(seg[:, :, keep], cfg),
    }


@pytest.mark.parametrize("profile", ["paper", "smoke"])
def test_prepared_arrays_equal_the_plain_formulas(brats2013_dir, tmp_path, profile):
    """BRATS 2013 (float32 labels, an int32 brain mask stored with a slope and intercept)."""
    cfg = get_config(profile, {"data.max_cases": 1}).data
    prepare_cache(brats2013_dir, tmp_path, cfg, progress=False)
    files = find_cases(brats2013_dir)[0]
    manifest = load_manifest(tmp_path)
    info = manifest["case_info"][0]
    for name, expected in _expected(files, cfg).items():
        got = np.load(tmp_path / "cases" / f"{files.case_id}.{name}.npy")
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
    for key, digest in info["checksums"].items():
        assert digest == hashlib.sha1(Path(files.paths[key]).read_bytes()).hexdigest()


def test_prepared_arrays_equal_the_plain_formulas_int16(brats2021_case, tmp_path):
    """BraTS 2021 (int16 images, uint8 labels with ET = 4, no brain mask)."""
    cfg = get_config("paper").data
    prepare_cache(brats2021_case, tmp_path, cfg, progress=False)
    files = find_cases(brats2021_case)[0]
    for name, expected in _expected(files, cfg).items():
        got = np.load(tmp_path / "cases" / f"{files.case_id}.{name}.npy")
        assert np.array_equal(got, expected), name


def test_workers_write_the_same_bytes(shared_data, tmp_path):
    cfg = get_config("smoke").data
    one, two = tmp_path / "one", tmp_path / "two"
    prepare_cache(shared_data / "brats", one, cfg, progress=False)
    prepare_cache(shared_data / "brats", two, cfg, progress=False, workers=2)
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert _files(one) == _files(two) and len(_files(one)) == 6
    with pytest.raises(ValueError, match="workers"):
        prepare_cache(shared_data / "brats", one, cfg, progress=False, workers=0)


def test_worker_errors_name_the_case(brats2021_case, tmp_path):
    data = tmp_path / "data"
    for name in ("A", "B"):
        shutil.copytree(brats2021_case, data / name)
    seg = data / "B" / "BraTS2021_00006_seg.nii.gz"
    img = nib.load(str(seg))
    bad = np.asarray(img.dataobj).copy()
    bad[bad == 4] = 3
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), str(seg))
    with pytest.raises(DataError, match=r"case B: .*label values \[3\]"):
        prepare_cache(data, tmp_path / "cache", get_config("smoke").data, progress=False,
                      workers=2)


def test_case_arrays_match_load_volume(brats2013_dir):
    """load_case reads each file once (raw views, a mask by bisection of its scaling) and gives
    the voxels, mask and labels of the plain per-file reads."""
    files = find_cases(brats2013_dir)[1]
    case = load_case(files)
    assert np.array_equal(case.t1ce, load_volume(files.paths["t1ce"])[0])
    assert np.array_equal(case.brain_mask, load_volume(files.paths["mask"])[0] > 0.5)
    seg = to_canonical(load_volume(files.paths["seg"])[0], "brats2013")
    assert case.seg.dtype == np.uint8 and np.array_equal(case.seg, seg)
    assert set(case.checksums) == {"t1ce", "flair", "seg", "mask"}
    t1ce, _ = case.normalized()
    assert np.array_equal(t1ce, normalize_intensity(case.t1ce, case.brain_mask))


def test_check_counts_equal_label_counts(shared_data):
    from fuse4seg.data.labels import label_counts
    from fuse4seg.data.layouts import check_dataset

    for folder in ("brats", "brats2013"):
        cases = find_cases(shared_data / folder)
        for summary, files in zip(check_dataset(shared_data / folder), cases, strict=True):
            assert not summary["errors"]
            assert summary["label_counts"] == label_counts(load_case(files).seg)


def test_check_workers_give_the_same_summaries(case_copy_pair):
    from fuse4seg.data.layouts import check_dataset

    one = check_dataset(case_copy_pair)
    assert check_dataset(case_copy_pair, workers=2) == one
    assert [bool(s["errors"]) for s in one] == [False, True]
    with pytest.raises(ValueError, match="workers"):
        check_dataset(case_copy_pair, workers=0)


@pytest.fixture()
def case_copy_pair(brats2021_case, tmp_path):
    """Two copies of the BraTS 2021 case, the second without its segmentation."""
    data = tmp_path / "pair"
    for name in ("A", "B"):
        shutil.copytree(brats2021_case, data / name)
    (data / "B" / "BraTS2021_00006_seg.nii.gz").unlink()
    return data
