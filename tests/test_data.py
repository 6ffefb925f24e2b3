"""The data layer on the real cases in ../shared/data, on broken copies of them, and the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fuse4seg.cli import main as cli_main
from fuse4seg.config import ConfigError, get_config, load_config
from fuse4seg.data.labels import from_canonical, label_counts, to_canonical
from fuse4seg.data.layouts import DataError, find_cases, load_case
from fuse4seg.data.slices import (
    SliceDataset,
    load_manifest,
    make_split,
    outside_crop,
    prepare_cache,
    preprocess_labels,
    preprocess_volume,
    restore_volume,
)


def _raw(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# --- real cases, three layouts; voxel counts computed independently here ----------------------


def test_brats2021_case_counts(brats2021_case):
    case = load_case(brats2021_case)
    raw = _raw(brats2021_case / "BraTS2021_00006_seg.nii.gz")
    assert case.layout == "brats2021" and case.scheme == "brats2021"
    assert case.shape == (240, 240, 155)
    counts = label_counts(case.seg)
    assert counts["NCR"] == int((raw == 1).sum())
    assert counts["ED"] == int((raw == 2).sum())
    assert counts["ET"] == int((raw == 4).sum())
    assert counts["background"] == int((raw == 0).sum())
    t1ce = nib.load(str(brats2021_case / "BraTS2021_00006_t1ce.nii.gz"))
    assert np.allclose(case.affine, t1ce.affine)


def test_brats2023_case_counts(brats2023_case):
    case = load_case(brats2023_case)
    raw = _raw(brats2023_case / "BraTS-GLI-00000-000-seg.nii.gz")
    assert case.layout == "brats2023" and case.shape == (182, 218, 182)
    counts = label_counts(case.seg)
    assert [counts[k] for k in ("NCR", "ED", "ET")] == [int((raw == v).sum()) for v in (1, 2, 3)]


def test_brats2013_cases_merge_non_enhancing(brats2013_dir):
    cases = find_cases(brats2013_dir)
    assert len(cases) == 4 and {c.layout for c in cases} == {"brats2013"}
    case = load_case(cases[0])
    raw = _raw(cases[0].paths["seg"])
    mask = _raw(cases[0].paths["mask"]) > 0.5
    counts = label_counts(case.seg)
    assert counts["NCR"] == int(((raw == 1) | (raw == 3)).sum())  # 3 merged into NCR
    assert counts["ED"] == int((raw == 2).sum())
    assert counts["ET"] == int((raw == 4).sum())
    assert np.array_equal(case.brain_mask, mask)  # the provided mask, not "non-zero"


def test_check_cli_json(shared_data, capsys):
    assert cli_main(["data", "check", str(shared_data / "brats"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["layout"] for s in out} == {"brats2021", "brats2023"}
    for s in out:
        assert s["errors"] == [] and set(s["label_counts"]) == {"background", "NCR", "ED", "ET"}


def test_normalize_intensity_range_and_background(brats2021_case):
    case = load_case(brats2021_case)
    t1ce, flair = case.normalized()
    for v in (t1ce, flair):
        assert v.dtype == np.float32 and v.min() == 0.0 and v.max() == 1.0
        assert np.all(v[~case.brain_mask] == 0)
    inside = t1ce[case.brain_mask]
    assert 0.004 < (inside == 1.0).mean() < 0.006  # the top 0.5 % saturate


def test_label_round_trip():
    raw = np.array([0, 1, 2, 4, 4, 0], dtype=np.uint8)
    canon = to_canonical(raw, "brats2021")
    assert canon.tolist() == [0, 1, 2, 3, 3, 0]
    assert from_canonical(canon, "brats2021").tolist() == raw.tolist()
    assert to_canonical(np.array([0, 1, 2, 3, 4]), "brats2013").tolist() == [0, 1, 2, 1, 3]
    assert to_canonical(np.array([1, 2, 3]), "msd").tolist() == [2, 1, 3]


# --- bad inputs: a fixture that breaks a copy of a real case -------------------------------


@pytest.fixture()
def case_copy(brats2021_case, tmp_path) -> Path:
    dst = tmp_path / "BraTS2021_00006"
    dst.mkdir()
    for mod in ("t1ce", "flair", "seg"):
        name = f"BraTS2021_00006_{mod}.nii.gz"
        shutil.copy(brats2021_case / name, dst / name)
    return dst


def _rewrite(path: Path, fn) -> None:
    img = nib.load(str(path))
    data, affine = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, affine, header), str(path))


def test_missing_modality(case_copy):
    (case_copy / "BraTS2021_00006_flair.nii.gz").unlink()
    # the message names the file it looked for
    with pytest.raises(DataError, match=r"BraTS2021_00006: missing FLAIR file: no "
                                        r"\*_flair\.nii\.gz or \*_flair\.nii in its folder "
                                        r"\(brats2021 layout\); rename the file, or give "
                                        r"--flair-pattern"):
        load_case(case_copy)


def test_shape_mismatch(case_copy):
    _rewrite(case_copy / "BraTS2021_00006_flair.nii.gz", lambda d, a: (d[:200], a))
    with pytest.raises(DataError, match=r"shape mismatch.*flair"):
        load_case(case_copy)


def test_affine_mismatch(case_copy):
    def shift(d, a):
        a[0, 3] += 5.0
        return d, a

    _rewrite(case_copy / "BraTS2021_00006_seg.nii.gz", shift)
    with pytest.raises(DataError, match=r"affine mismatch.*seg"):
        load_case(case_copy)


def test_nan_values(case_copy):
    def nan(d, a):
        d = d.astype(np.float32)
        d[100, 100, 70] = np.nan
        return d, a

    _rewrite(case_copy / "BraTS2021_00006_t1ce.nii.gz", nan)
    with pytest.raises(DataError, match=r"t1ce.*NaN or inf"):
        load_case(case_copy)


def test_all_zero_volume(case_copy):
    _rewrite(case_copy / "BraTS2021_00006_flair.nii.gz", lambda d, a: (np.zeros_like(d), a))
    with pytest.raises(DataError, match=r"FLAIR volume .* all zero"):
        load_case(case_copy)


def test_labels_outside_scheme(case_copy):
    def three(d, a):
        d[d == 4] = 3  # 3 is not a BraTS 2021 label
        return d, a

    _rewrite(case_copy / "BraTS2021_00006_seg.nii.gz", three)
    with pytest.raises(DataError, match=r"label values \[3\] are outside the brats2021"):
        load_case(case_copy)


def test_truncated_file(case_copy):
    path = case_copy / "BraTS2021_00006_t1ce.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DataError, match=r"t1ce.*unreadable or truncated"):
        load_case(case_copy)


def test_damaged_gzip_data_is_refused_not_read(case_copy, capsys):
    """Bytes changed inside a .nii.gz: the gzip CRC fails. nibabel alone reads such a file
    without complaint (it never reaches the checksum); the loader must refuse it, and
    `data check` must list the case as bad."""
    path = case_copy / "BraTS2021_00006_flair.nii.gz"
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 200] = bytes(b ^ 0x5A for b in blob[middle : middle + 200])
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"flair.*damaged gzip data"):
        load_case(case_copy)
    assert cli_main(["data", "check", str(case_copy.parent)]) == 1
    assert "damaged gzip data" in capsys.readouterr().err


def test_check_cli_names_bad_case(case_copy, capsys):
    (case_copy / "BraTS2021_00006_seg.nii.gz").unlink()
    assert cli_main(["data", "check", str(case_copy.parent)]) == 1
    captured = capsys.readouterr()
    assert "BraTS2021_00006" in captured.err and "missing segmentation" in captured.err
    # the case is named once per line, not "case X: case X: ..."
    for text in (captured.out, captured.err):
        line = next(x for x in text.splitlines() if "missing segmentation" in x)
        assert line.count("BraTS2021_00006") == 1, line


def test_check_cli_lists_a_folder_in_a_files_place_as_a_bad_case(case_copy, capsys):
    flair = case_copy / "BraTS2021_00006_flair.nii.gz"
    flair.unlink()
    flair.mkdir()  # named like the FLAIR file
    assert cli_main(["data", "check", str(case_copy.parent)]) == 1
    assert f"{flair}: the FLAIR file is a folder" in capsys.readouterr().err


def test_two_files_for_one_role_make_a_bad_case_that_names_both(case_copy, capsys):
    """A second label map beside the first (a model's output, an older version) or the same
    volume compressed and not: the case is bad and the message names both files, instead of
    training on whichever sorts first."""
    seg = case_copy / "BraTS2021_00006_seg.nii.gz"
    other = case_copy / "BraTS2021_00006_model_seg.nii.gz"
    shutil.copy(seg, other)
    _rewrite(other, lambda d, a: (np.where(d == 2, 0, d).astype(d.dtype), a))  # no edema
    with pytest.raises(DataError, match=r"2 files in .* fit the seg file .*: "
                                        r"BraTS2021_00006_model_seg\.nii\.gz, "
                                        r"BraTS2021_00006_seg\.nii\.gz; move the extra one "
                                        r"out of the case folder"):
        load_case(case_copy)
    assert cli_main(["data", "check", str(case_copy.parent)]) == 1
    assert "BraTS2021_00006_model_seg.nii.gz" in capsys.readouterr().err
    # the explicit pattern that says which one reads the right labels
    case = load_case(find_cases(case_copy.parent,
                                patterns={"seg": "*00006_seg.nii.gz"})[0])
    assert case.seg is not None and np.count_nonzero(case.seg == 2) > 0
    other.unlink()
    flair = case_copy / "BraTS2021_00006_flair.nii.gz"
    (case_copy / "BraTS2021_00006_flair.nii").write_bytes(
        nib.load(str(flair)).to_bytes())  # the same volume, uncompressed
    with pytest.raises(DataError, match=r"fit the flair file .*BraTS2021_00006_flair\.nii, "
                                        r"BraTS2021_00006_flair\.nii\.gz"):
        load_case(case_copy)


def test_a_named_case_with_two_label_files_is_bad_and_a_mask_gives_way(case_copy, tmp_path):
    """Without patterns the ``named`` words decide: two files with a label word make the case
    bad; a file that also carries another role's word (``t1post_brainmask``) is that role's,
    not a second T1ce."""
    named = tmp_path / "named" / "s1"
    named.mkdir(parents=True)
    shutil.copy(case_copy / "BraTS2021_00006_t1ce.nii.gz", named / "s1_T1post.nii.gz")
    shutil.copy(case_copy / "BraTS2021_00006_flair.nii.gz", named / "s1_FLAIR.nii.gz")
    shutil.copy(case_copy / "BraTS2021_00006_seg.nii.gz", named / "s1_label.nii.gz")
    img = nib.load(str(named / "s1_T1post.nii.gz"))
    brain = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(brain, img.affine), str(named / "s1_T1post_brainmask.nii.gz"))
    (case,) = find_cases(named.parent)
    assert case.layout == "named" and not case.problems
    assert case.paths["t1ce"].name == "s1_T1post.nii.gz"
    assert case.paths["mask"].name == "s1_T1post_brainmask.nii.gz"
    shutil.copy(named / "s1_label.nii.gz", named / "s1_label_old.nii.gz")
    (case,) = find_cases(named.parent)
    with pytest.raises(DataError, match=r"2 files in .* fit the seg file \(the words seg, "
                                        r".*\): s1_label\.nii\.gz, s1_label_old\.nii\.gz"):
        load_case(case)
    # two files with both a label word and another role's: neither is taken unsaid
    (named / "s1_label_old.nii.gz").unlink()
    (named / "s1_label.nii.gz").rename(named / "s1.t1gd.label.nii.gz")
    shutil.copy(named / "s1.t1gd.label.nii.gz", named / "s1.FLAIR.label.nii.gz")
    (case,) = find_cases(named.parent)
    assert case.paths["seg"] is None and "s1.FLAIR.label.nii.gz, s1.t1gd.label" in (
        case.problems["seg"])
    # two FLAIR files: still a named case (a bad one), not an unrecognised folder
    shutil.copy(named / "s1_FLAIR.nii.gz", named / "s1_FLAIR_2.nii.gz")
    (case,) = find_cases(named.parent)
    assert case.layout == "named" and "fit the flair file" in case.problems["flair"]


def test_rgb_and_complex_volumes_are_refused_with_their_dtype(case_copy, capsys):
    flair = case_copy / "BraTS2021_00006_flair.nii.gz"
    img = nib.load(str(flair))
    grey = np.clip(np.asarray(img.dataobj), 0, 255).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rgb["G"] = rgb["B"] = grey
    nib.save(nib.Nifti1Image(rgb, img.affine), str(flair))
    with pytest.raises(DataError, match=r"_flair\.nii\.gz: the FLAIR file stores multi-field "
                                        r"\(RGB or RGBA\) voxels"):
        load_case(case_copy)
    assert cli_main(["data", "check", str(case_copy.parent)]) == 1  # a bad case, no traceback
    assert "multi-field (RGB or RGBA) voxels" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(grey.astype(np.complex64), img.affine), str(flair))
    with pytest.raises(DataError, match=r"stores complex voxels \(complex64\)"):
        load_case(case_copy)


def test_a_given_layout_reads_every_case_with_its_names(brats2021_case, brats2023_case,
                                                        tmp_path, capsys):
    """``--layout`` forces: the BraTS 2021 case read as ``named`` (its words fit), and a BraTS
    2023 case forced to ``brats2021`` is a bad case that names the file it looked for."""
    (case,) = find_cases(brats2021_case, layout="named")
    assert case.layout == "named"
    assert np.array_equal(load_case(case).seg, load_case(brats2021_case).seg)
    root = tmp_path / "mixed"
    for src in (brats2021_case, brats2023_case):
        shutil.copytree(src, root / src.name)
    assert cli_main(["data", "check", str(root), "--layout", "brats2021"]) == 1
    err = capsys.readouterr().err
    assert f"bad case {brats2023_case.name}: missing T1ce file: no *_t1ce.nii.gz" in err
    # a stray NIfTI file beside the case folders (an atlas) does not make the dataset folder
    # one case
    shutil.copy(next(brats2021_case.glob("*_flair.nii.gz")), root / "atlas.nii.gz")
    assert sorted(c.case_id for c in find_cases(root, layout="brats2021")) == sorted(
        [brats2021_case.name, brats2023_case.name])
    # a case folder given alone with a forced layout is that one case
    (case,) = find_cases(root / brats2021_case.name, layout="brats2021")
    assert case.case_id == brats2021_case.name and not case.problems


def test_an_msd_image_twice_is_one_bad_case(brats2021_case, tmp_path):
    """MSD Task01 keys a case by its file name: ``X.nii`` beside ``X.nii.gz`` is one case
    with a problem, not two cases of one id whose cache files would collide."""
    img = nib.load(str(next(brats2021_case.glob("*_t1ce.nii.gz"))))
    data = np.asarray(img.dataobj).astype(np.float32)
    stack = nib.Nifti1Image(np.stack([data] * 4, axis=-1), img.affine)
    labels = nib.Nifti1Image(np.zeros(data.shape, np.uint8), img.affine)
    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("BRATS_001.nii.gz", "BRATS_002.nii.gz", "BRATS_002.nii"):
        nib.save(stack, str(root / "imagesTr" / name))
        nib.save(labels, str(root / "labelsTr" / name))
    cases = find_cases(root)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert not cases[0].problems
    assert set(cases[1].problems) == {"t1ce", "flair", "seg"}
    with pytest.raises(DataError, match=r"BRATS_002\.nii, BRATS_002\.nii\.gz; move the extra"):
        load_case(cases[1])


def test_empty_folder_error(tmp_path, capsys):
    assert cli_main(["data", "check", str(tmp_path)]) == 2
    assert "no BraTS cases found" in capsys.readouterr().err


# --- slices, split, cache rebuild rule ------------------------------------------------------


def test_split_is_disjoint_and_seeded():
    ids = [f"c{i:03d}" for i in range(50)]
    split = make_split(ids, (0.7, 0.1, 0.2), seed=3)
    sets = [set(split[k]) for k in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(ids)
    assert [len(s) for s in sets] == [35, 5, 10]
    assert make_split(ids, (0.7, 0.1, 0.2), seed=3) == split
    assert make_split(ids, (0.7, 0.1, 0.2), seed=4) != split
    small = make_split(["a", "b", "c"], (0.7, 0.1, 0.2), seed=0)
    assert all(len(v) == 1 for v in small.values())


def test_geometry_round_trip():
    cfg = get_config("smoke").data  # downsample 4, crop 64
    rng = np.random.default_rng(0)
    seg = np.zeros((240, 240, 5), np.uint8)
    seg[100:140, 92:148, :] = 2
    seg[112:128, 100:120, :] = 3
    slices = preprocess_labels(seg, cfg)
    assert slices.shape == (5, 64, 64)
    back = restore_volume(slices, seg.shape, cfg, labels=True)
    assert back.shape == seg.shape and np.array_equal(back, seg)  # block-aligned regions
    img = rng.random((240, 240, 5)).astype(np.float32)
    out = preprocess_volume(img, cfg)
    assert np.isclose(out[0, 2 + 10, 2 + 10], img[40:44, 40:44, 0].mean(), atol=1e-6)
    assert restore_volume(out, img.shape, cfg, labels=False).shape == img.shape
    # the image path's values: a constant comes back as itself, a ramp along x as the ramp
    # (bilinear, away from the edges, where the downsampled grid has no neighbour outside)
    flat = np.full((240, 240, 5), 0.7, np.float32)
    back = restore_volume(preprocess_volume(flat, cfg), flat.shape, cfg, labels=False)
    assert np.abs(back - 0.7).max() < 1e-6
    ramp = np.broadcast_to(np.linspace(0, 1, 240, dtype=np.float32)[:, None, None],
                           (240, 240, 5)).copy()
    back = restore_volume(preprocess_volume(ramp, cfg), ramp.shape, cfg, labels=False)
    assert np.abs(back - ramp)[8:-8].max() < 1e-6


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cache_rebuild_rule(brats2021_case, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(brats2021_case, data / "BraTS2021_00006")
    cache = tmp_path / "cache"
    cfg = get_config("smoke").data
    manifest = prepare_cache(data, cache, cfg, progress=False)
    first = manifest.stat().st_mtime_ns
    arrays = cache / "cases" / "BraTS2021_00006.t1ce.npy"
    arrays_time = arrays.stat().st_mtime_ns
    # the arrays get the mode the manifest gets (mkstemp alone makes 0600 files, which another
    # user of a shared cache could not read)
    modes = {p.stat().st_mode & 0o777 for p in (manifest, *(cache / "cases").iterdir())}
    assert modes == {0o666 & ~_umask()}
    prepare_cache(data, cache, cfg, progress=False)  # same inputs: nothing is written
    assert manifest.stat().st_mtime_ns == first and arrays.stat().st_mtime_ns == arrays_time
    # a changed input file rebuilds that case
    _rewrite(data / "BraTS2021_00006" / "BraTS2021_00006_flair.nii.gz", lambda d, a: (d * 2, a))
    prepare_cache(data, cache, cfg, progress=False)
    assert arrays.stat().st_mtime_ns != arrays_time
    # changed settings rebuild everything
    arrays_time = arrays.stat().st_mtime_ns
    cfg2 = get_config("smoke", {"data.crop_size": 80}).data
    prepare_cache(data, cache, cfg2, progress=False)
    m = load_manifest(cache)
    assert m["settings"]["crop_size"] == 80 and arrays.stat().st_mtime_ns != arrays_time
    ds = SliceDataset(cache, "all")
    item = ds[0]
    assert item["x1"].shape == (1, 80, 80) and item["seg"].dtype.is_floating_point is False
    assert len(m["case_info"][0]["checksums"]) == 3


def test_outside_crop_counts_what_the_crop_cuts_away():
    cfg = get_config("default").data  # 3x down-sampling, 64x64 centre crop of 80x80
    mask = np.zeros((240, 240, 4), bool)
    mask[60:180, 60:180, :] = True  # 40x40 after down-sampling: inside the crop
    assert outside_crop(mask, cfg) == 0.0
    mask[0:3, 100:103, 0] = True  # one down-sampled pixel in the first row: cropped away
    assert outside_crop(mask, cfg) == pytest.approx(9 / mask.sum())
    assert outside_crop(np.zeros_like(mask), cfg) == 0.0


def test_prepare_warns_when_the_crop_cuts_brain_or_tumour(brats2021_case, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(brats2021_case, data / "BraTS2021_00006")
    # the real case at the default geometry: all of it inside the crop, no warning
    cfg = get_config("default").data
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_cache(data, tmp_path / "fits", cfg, progress=False)
    info = load_manifest(tmp_path / "fits")["case_info"][0]
    assert info["brain_outside_crop"] == 0.0 and info["tumour_outside_crop"] == 0.0
    # a 32x32 crop of 3 mm slices cuts brain (and here tumour) away: named in the warning
    small = get_config("default", {"data.crop_size": 32}).data
    with pytest.warns(UserWarning, match=r"crop_size=32 .* BraTS2021_00006 \(brain"):
        prepare_cache(data, tmp_path / "cut", small, progress=False)
    info = load_manifest(tmp_path / "cut")["case_info"][0]
    assert 0.0 < info["brain_outside_crop"] < 1.0
    # resolving the same cache again in this process says nothing new
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_cache(data, tmp_path / "cut", small, progress=False)
    # a crop far larger than the 80x80 slices: mostly zeros, said once (a review found a
    # 400x400 crop prepared without a word)
    large = get_config("default", {"data.crop_size": 400}).data
    with pytest.warns(UserWarning, match=r"crop_size=400 after 3x down-sampling pads every "
                      r"case's slices \(at most 80 pixels a side\) .* 25.0x the pixels.* "
                      r"data.crop_size=80 holds them all"):
        prepare_cache(data, tmp_path / "padded", large, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_cache(data, tmp_path / "padded", large, progress=False)


def test_prepare_stops_cleanly_or_skips_bad_cases(brats2021_case, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(brats2021_case, data / "BraTS2021_00006")
    shutil.copytree(brats2021_case, data / "BraTS2021_00007")
    for f in (data / "BraTS2021_00007").iterdir():
        f.rename(f.with_name(f.name.replace("00006", "00007")))
    flair = data / "BraTS2021_00007" / "BraTS2021_00007_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:2000])  # truncated
    cfg = get_config("smoke").data
    # stopped: the bad case is named with what to do, and no cache folder is left
    with pytest.raises(DataError) as info:
        prepare_cache(data, tmp_path / "cache", cfg, progress=False)
    assert "BraTS2021_00007" in str(info.value) and "--skip-bad" in str(info.value)
    assert not (tmp_path / "cache").exists()
    # skipped: the good case is prepared, the bad one listed in the manifest
    with pytest.warns(UserWarning, match="left out 1 bad case"):
        prepare_cache(data, tmp_path / "cache", cfg, progress=False, skip_bad=True)
    m = load_manifest(tmp_path / "cache")
    assert m["cases"] == ["BraTS2021_00006"]
    assert [e["case_id"] for e in m["skipped"]] == ["BraTS2021_00007"]
    # a stopped update of an existing cache takes its manifest away (arrays may have changed)
    with pytest.raises(DataError):
        prepare_cache(data, tmp_path / "cache", get_config("smoke", {"data.crop_size": 80}).data,
                      progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    # the CLI: --skip-bad says what it left out; --out = the data folder is refused
    assert cli_main(["data", "prepare", str(data), "--out", str(tmp_path / "c2"), "--profile",
                     "smoke", "--skip-bad"]) == 0
    assert "left out BraTS2021_00007" in capsys.readouterr().out
    # as a user sees it (pytest records warnings itself): the warning is one line of the
    # command's own, not Python's file:line and the source line that warned
    import subprocess
    import sys

    shown = subprocess.run(
        [sys.executable, "-m", "fuse4seg", "data", "prepare", str(data), "--out",
         str(tmp_path / "c3"), "--profile", "smoke", "--skip-bad"],
        capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    (warning,) = [x for x in shown.stderr.splitlines() if "--skip-bad: left out" in x]
    assert warning.startswith("fuse4seg: warning: --skip-bad: left out 1 bad case")
    assert ".py:" not in shown.stderr and "prepare_cache(" not in shown.stderr
    assert cli_main(["data", "prepare", str(data), "--out", str(data), "--profile",
                     "smoke"]) == 2
    assert "is the data folder itself" in capsys.readouterr().err


def test_skip_bad_names_each_left_out_case_once(brats2021_case, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(brats2021_case, data / "BraTS2021_00006")
    (data / "BraTS2021_00006" / "BraTS2021_00006_seg.nii.gz").unlink()
    shutil.copytree(brats2021_case, data / "BraTS2021_00007")
    for f in (data / "BraTS2021_00007").iterdir():
        f.rename(f.with_name(f.name.replace("00006", "00007")))
    with pytest.warns(UserWarning, match="left out 1 bad case") as caught:
        prepare_cache(data, tmp_path / "cache", get_config("smoke").data, progress=False,
                      skip_bad=True)
    (text,) = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert "BraTS2021_00006: missing segmentation" in text, text
    assert text.count("BraTS2021_00006") == 1, text  # not "X: case X: ..."


def test_prepare_refuses_a_folder_of_other_files_and_cleans_an_empty_one(brats2021_case,
                                                                          tmp_path):
    """--out an existing folder: one holding the user's own files (a manifest.json of theirs,
    or anything without a manifest) is refused before anything is written, and left as it
    was; in an existing empty folder a stopped preparation leaves no arrays behind."""
    data = tmp_path / "data"
    shutil.copytree(brats2021_case, data / "BraTS2021_00006")
    cfg = get_config("smoke").data
    user = tmp_path / "user"
    user.mkdir()
    (user / "manifest.json").write_text('{"my": "own"}')
    (user / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="its manifest.json is not a fuse4seg slice cache"):
        prepare_cache(data, user, cfg, progress=False)
    (user / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"holds files that are not a slice cache \(notes.txt\)"):
        prepare_cache(data, user, cfg, progress=False)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    # an empty folder, a stopped preparation: nothing of it is left
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = data / "BraTS2021_00006" / "BraTS2021_00006_flair.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[:2000])
    with pytest.raises(DataError):
        prepare_cache(data, empty, cfg, progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    # and the same folder then takes the cache, and a later run updates it in place
    bad.write_bytes(good)
    prepare_cache(data, empty, cfg, progress=False)
    prepare_cache(data, empty, cfg, progress=False)
    assert load_manifest(empty)["cases"] == ["BraTS2021_00006"]


def test_prepare_cli(shared_data, tmp_path, capsys):
    out = tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"its test split is empty \(2 cases, "
                                         r"data.split_fractions \[[0-9., ]+\]\): add cases"):
        assert cli_main(["data", "prepare", str(shared_data / "brats"), "--out", str(out),
                         "--profile", "smoke"]) == 0
    assert "2 cases" in capsys.readouterr().out
    ds = SliceDataset(out, "all")
    labels = set()
    for i in range(len(ds)):
        labels |= set(ds[i]["seg"].unique().tolist())
    assert labels == {0, 1, 2, 3}
    assert cli_main(["data", "prepare", str(shared_data / "brats"), "--out", str(out),
                     "--profile", "smoke"]) == 0
    assert "up to date" in capsys.readouterr().out


# --- configuration ------------------------------------------------------------------------


def test_config_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting 'inner_stepz'.*train.inner_steps"):
        get_config("smoke", {"inner_stepz": 3})
    # the likely name first, before the whole list
    with pytest.raises(ConfigError, match=r"'train.lr_leadr'; did you mean 'train.lr_leader'"):
        get_config("smoke", {"train.lr_leadr": 1e-3})


def test_config_bad_values():
    with pytest.raises(ConfigError, match="unknown profile"):
        get_config("fast")
    with pytest.raises(ConfigError, match="expected an integer"):
        get_config("smoke", {"train.inner_steps": "five"})
    assert get_config("smoke", {"train.lr_follower": "3e-3"}).train.lr_follower == 3e-3
    with pytest.raises(ConfigError, match="expected a number"):
        get_config("smoke", {"train.lr_follower": "fast"})
    with pytest.raises(ConfigError, match="multiple of 16"):
        get_config("smoke", {"crop_size": 70})
    # what torch or an empty validation would otherwise report without naming the setting
    for overrides, message in (
        ({"train.val_max_slices": 0}, "train.val_max_slices must be >= 1 or null, got 0"),
        ({"train.weight_decay": -1.0}, "train.weight_decay must be a finite number >= 0"),
        ({"train.warmup_epochs": 0, "train.rollout_epochs": 0}, "both 0: nothing to train"),
        # accepted before, each failing late (a non-finite loss after the warm-up) or silently
        # (a NaN clip turned clipping off), or inside torch's padding (a crop of 1: the INN's
        # bottleneck reflect-pads its 3x3 depthwise convolution, models/fusion.py)
        ({"train.lr_follower_rollout": float("inf")},
         "train.lr_follower_rollout must be a finite number > 0 or null, got inf"),
        ({"train.grad_clip": float("nan")}, "train.grad_clip must be a finite number >= 0"),
        ({"fusion.lr": float("inf")}, "fusion.lr must be a finite number > 0 or null, got inf"),
        ({"fusion.crop": 1}, r"fusion.crop must be >= 2 \(the leader's 3x3 depthwise "),
    ):
        with pytest.raises(ConfigError, match=message):
            get_config("smoke", overrides)


def test_every_refused_value_names_the_settings_its_check_reads():
    """``ConfigError.problems`` pairs each part of validate's message with the settings its
    check reads, which ``config_of`` leads with the ``--set`` items that gave them (it read
    the names out of the message's text before). Every check made to fail at once: each part
    names real settings, and the parts are the message."""
    from dataclasses import replace

    from fuse4seg.config import valid_names, validate

    c = get_config("smoke")
    broken = replace(
        c,
        data=replace(c.data, downsample=0, crop_size=17, min_brain_fraction=1.0,
                     slice_stride=0, max_cases=0, intensity_percentiles=(50.0, 40.0),
                     split_fractions=(0.5, 0.1, 0.1), split_seed=-1),
        train=replace(c.train, seed=-1, warmup_epochs=-1, rollout_epochs=-1,
                      weight_decay=-1.0, val_max_slices=0, inner_steps=0, batch_size=1,
                      lr_leader=0.0, lr_follower=0.0, lr_follower_rollout=0.0,
                      warmup_anneal=True, grad_clip=-1.0, ema_decay=1.0, follower_ema=1.0,
                      steps_per_epoch=0, val_every=0),
        fusion=replace(c.fusion, steps=0, crop=1, batch=0, lr=0.0, log_every=0),
        loss=replace(c.loss, dice_class_weights=(1.0, -1.0), dice_smooth=0.0,
                     alpha_decomp=-1.0, beta_grad=-1.0, gamma_recon=-1.0),
    )
    with pytest.raises(ConfigError) as info:
        validate(broken)
    problems = info.value.problems
    assert len(problems) == 36  # every check of validate (a new one: break it above too)
    assert str(info.value) == "; ".join(message for _, message in problems)
    valid = set(valid_names())
    for names, message in problems:
        assert names and set(names) <= valid, (names, message)
        for name in names:  # the whole name: train.lr_follower is not train.lr_follower_rollout
            assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), (name, message)
    assert dict((m, n) for n, m in problems)[
        "train.warmup_epochs and train.rollout_epochs are both 0: nothing to train"] == (
        "train.warmup_epochs", "train.rollout_epochs")
    # where the rollout rate is null the anneal check reads train.lr_follower only to compare
    # it with that rate, and the message does not name it
    anneal = replace(c, train=replace(c.train, warmup_anneal=True, lr_follower_rollout=None))
    with pytest.raises(ConfigError) as info:
        validate(anneal)
    assert [names for names, _ in info.value.problems] == [
        ("train.warmup_anneal", "train.lr_follower_rollout")]
    with pytest.raises(ConfigError) as info:
        get_config("smoke", {"inner_stepz": 3})
    assert info.value.unknown == "inner_stepz" and info.value.problems == []


def test_one_setting_gets_one_value_and_the_profile_is_no_override():
    """Two names of one setting (``seed``, ``train.seed``) with different values used to give
    whichever came last; ``profile`` as an override relabelled the config without changing a
    setting (runs named ``*-paper-*`` with smoke's settings)."""
    from fuse4seg.config import parse_overrides

    with pytest.raises(ConfigError, match="train.seed is given two values, 1 and 2"):
        get_config("smoke", {"seed": 1, "train.seed": 2})
    assert get_config("smoke", {"seed": 3, "train.seed": 3}).train.seed == 3
    with pytest.raises(ConfigError, match="--set seed=1 and --set train.seed=2 give train.seed "
                                          "two values: give one"):
        parse_overrides(["seed=1", "train.seed=2"])
    # compared as the setting takes them: YAML 1.1 reads 2e-3 as a string
    assert parse_overrides(["lr_follower=2e-3", "train.lr_follower=0.002"]) == {
        "lr_follower": "2e-3", "train.lr_follower": 0.002}
    with pytest.raises(ConfigError, match="--set seed=x: train.seed: expected an integer"):
        parse_overrides(["seed=x"])
    with pytest.raises(ConfigError, match="profile is not a setting to override"):
        get_config("smoke", {"profile": "paper"})


def test_config_yaml_round_trip(tmp_path):
    cfg = get_config("default", {"inner_steps": 4, "alpha_decomp": 0.5})
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = load_config(path)
    assert again == cfg and again.short_hash() == cfg.short_hash()


def test_the_paper_profile_holds_section_4_1_and_adds_no_clipping():
    paper = get_config("paper")
    t, loss = paper.train, paper.loss
    assert (t.warmup_epochs, t.rollout_epochs, t.inner_steps, t.batch_size) == (40, 120, 5, 8)
    assert (t.lr_leader, t.lr_follower, t.weight_decay, t.ema_decay) == (1e-4, 3e-4, 1e-5, 0.99)
    assert (loss.alpha_decomp, loss.beta_grad, loss.gamma_recon) == (1.0, 5.0, 0.05)
    assert t.amp and t.lr_follower_rollout is None and t.follower_ema is None
    # gradient clipping is not in the paper: off there, on where every figure was made with it
    assert t.grad_clip <= 0
    assert get_config("default").train.grad_clip == get_config("smoke").train.grad_clip == 1.0


def test_a_downsample_that_leaves_almost_nothing_is_refused_by_name():
    cfg = get_config("smoke", {"data.downsample": 3}).data
    assert preprocess_volume(np.ones((48, 48, 2), np.float32), cfg).shape == (2, 64, 64)
    with pytest.raises(DataError, match="data.downsample=3 leaves 14x16 pixels of a 40x48 "
                                        "slice, fewer than 16 a side"):
        preprocess_volume(np.ones((40, 48, 2), np.float32), cfg)


def test_geometry_round_trip_when_cropping():
    cfg = get_config("paper", {"data.crop_size": 224}).data  # 240 -> 224: a real crop
    seg = np.zeros((240, 240, 3), np.uint8)
    seg[100:140, 60:180, :] = 2
    seg[0:5, 0:5, :] = 1  # outside the central 224 crop: lost by design
    slices = preprocess_labels(seg, cfg)
    assert slices.shape == (3, 224, 224)
    back = restore_volume(slices, seg.shape, cfg, labels=True)
    inside = np.s_[8:232, 8:232, :]
    assert np.array_equal(back[inside], seg[inside])
    assert back[0:5, 0:5].sum() == 0
