"""Real cases the way users have them: other file names, uncompressed .nii, mixed layouts,
explicit patterns, and an unrecognised folder that says what it found and what it tried."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fuse4seg.config import get_config
from fuse4seg.data.layouts import DataError, find_cases, guess_scheme, load_case
from fuse4seg.data.slices import prepare_cache


def _copy(src: Path, dst: Path, gunzip: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if gunzip:
        with gzip.open(src, "rb") as f_in, open(dst, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    else:
        shutil.copy(src, dst)


@pytest.fixture(scope="module")
def renamed(brats2021_case, tmp_path_factory):
    """The real BraTS 2021 case under three other naming habits, plus the original."""
    root = tmp_path_factory.mktemp("mixed")
    src = {k: next(brats2021_case.glob(f"*_{k}.nii.gz")) for k in ("t1ce", "flair", "seg")}
    _copy(src["t1ce"], root / "caseA" / "T1c.nii.gz")
    _copy(src["flair"], root / "caseA" / "Flair.nii.gz")
    _copy(src["seg"], root / "caseA" / "segmentation.nii.gz")
    _copy(src["t1ce"], root / "caseB" / "sub01_t1gd.nii", gunzip=True)  # uncompressed
    _copy(src["flair"], root / "caseB" / "sub01_flair.nii", gunzip=True)
    _copy(src["seg"], root / "caseB" / "label.nii.gz")
    shutil.copytree(brats2021_case, root / brats2021_case.name)
    return root, brats2021_case


def test_other_names_and_uncompressed_files_read_as_the_original(renamed):
    root, original = renamed
    cases = {c.case_id: c for c in find_cases(root)}
    assert cases["caseA"].layout == cases["caseB"].layout == "named"
    assert cases[original.name].layout == "brats2021"  # mixed layouts in one folder
    ref = load_case(cases[original.name])
    for cid in ("caseA", "caseB"):
        case = load_case(cases[cid])
        assert case.scheme == "brats2021"  # ET = 4 in the file: read from the values
        assert np.array_equal(case.seg, ref.seg)
        assert np.array_equal(case.t1ce, ref.t1ce) and np.array_equal(case.flair, ref.flair)


def test_explicit_patterns_override_detection(renamed, tmp_path):
    root, _ = renamed
    odd = tmp_path / "odd" / "p1"
    for name in ("post.nii.gz", "fl.nii.gz", "roi.nii.gz"):
        _copy(root / "caseA" / {"post.nii.gz": "T1c.nii.gz", "fl.nii.gz": "Flair.nii.gz",
                                "roi.nii.gz": "segmentation.nii.gz"}[name], odd / name)
    with pytest.raises(DataError) as info:
        find_cases(odd.parent)
    message = str(info.value)
    assert "p1" in message and "post.nii.gz" in message and "roi.nii.gz" in message
    assert "Patterns tried" in message and "--t1ce-pattern" in message
    (case,) = find_cases(odd.parent, patterns={"t1ce": "post*", "flair": "fl*", "seg": "roi*"})
    assert case.layout == "named" and case.paths["seg"].name == "roi.nii.gz"
    with pytest.raises(DataError, match="unknown keys"):
        find_cases(odd.parent, patterns={"t2": "x*"})
    # a pattern that matches several files names them, instead of taking the first; the case
    # is found (so `data check` goes on to the other cases) and refused when it is read
    (several,) = find_cases(odd.parent, patterns={"t1ce": "*.nii.gz", "flair": "fl*",
                                                  "seg": "roi*"})
    with pytest.raises(DataError) as info:
        load_case(several)
    message = str(info.value)
    assert message.startswith("case p1: --t1ce-pattern '*.nii.gz' matches 3 files")
    assert "fl.nii.gz" in message
    # one file in two roles (FLAIR read as T1ce too) is refused
    (twice,) = find_cases(odd.parent, patterns={"t1ce": "fl*", "flair": "fl*", "seg": "roi*"})
    with pytest.raises(DataError, match="fl.nii.gz would be read as both t1ce and flair"):
        load_case(twice)
    # a segmentation pattern that matches nothing is named, and only where it is needed
    (no_seg,) = find_cases(odd.parent, patterns={"t1ce": "post*", "flair": "fl*",
                                                 "seg": "label*"})
    with pytest.raises(DataError, match=r"--seg-pattern 'label\*' matches no file in"):
        load_case(no_seg)
    assert load_case(no_seg, require_seg=False).seg is None
    # neither image pattern matches anything: a bad case, whose patterns and files are named
    (none,) = find_cases(odd.parent, patterns={"t1ce": "T1*", "flair": "FLAIR*"})
    with pytest.raises(DataError, match=r"case p1: --t1ce-pattern 'T1\*' matches no file in "
                                        r".*files found: .*fl\.nii\.gz"):
        load_case(none)
    # one image pattern matches: a case, whose other pattern is named when it is read
    (half,) = find_cases(odd.parent, patterns={"t1ce": "post*", "flair": "FLAIR*"})
    with pytest.raises(DataError, match=r"case p1: --flair-pattern 'FLAIR\*' matches no file"):
        load_case(half)


def test_scheme_guess_from_values():
    assert guess_scheme(np.array([0, 1, 2, 4])) == "brats2021"
    assert guess_scheme(np.array([0, 1, 2, 3])) == "brats2023"
    assert guess_scheme(np.array([0, 1, 3, 4])) == "brats2013"


def test_the_cache_records_each_cases_scheme_and_a_run_takes_the_most_common(
        brats2023_case, tmp_path):
    """A ``named`` case's scheme, read from its labels, is kept in the manifest, so a run
    trained on it writes ``predict``'s labels in that scheme (an earlier cache recorded only
    the layout, and a run trained on ``named`` data could not predict without --scheme)."""
    from fuse4seg.data.slices import load_manifest, training_scheme

    src = {k: next(brats2023_case.glob(f"*-{k}.nii.gz")) for k in ("t1c", "t2f", "seg")}
    data = tmp_path / "data" / "sub01"
    _copy(src["t1c"], data / "sub01_t1gd.nii.gz")
    _copy(src["t2f"], data / "sub01_flair.nii.gz")
    _copy(src["seg"], data / "sub01_label.nii.gz")  # 0-3, ET = 3: BraTS 2023+
    prepare_cache(data.parent, tmp_path / "cache", get_config("smoke").data, progress=False)
    manifest = load_manifest(tmp_path / "cache")
    (entry,) = manifest["case_info"]
    assert (entry["layout"], entry["scheme"]) == ("named", "brats2023")
    assert training_scheme(manifest, ["sub01"]) == "brats2023"
    # the most common scheme; a tie goes to the first case by name; an entry without a scheme
    # counts by its layout's, a named one by none
    info = [{"case_id": "a", "layout": "brats2021"}, {"case_id": "b", "layout": "named"},
            {"case_id": "c", "layout": "named", "scheme": "brats2023"},
            {"case_id": "d", "layout": "brats2023"}]
    old = {"case_info": info}
    assert training_scheme(old, ["a", "b", "c", "d"]) == "brats2023"
    assert training_scheme(old, ["a", "c"]) == "brats2021"
    assert training_scheme(old, ["c", "a"]) == "brats2021"
    assert training_scheme(old, ["b"]) is None  # nothing known: predict asks for --scheme


def test_cli_check_with_patterns(renamed, tmp_path, capsys):
    from fuse4seg.cli import main

    root, _ = renamed
    argv = ["data", "check", str(root / "caseA"), "--t1ce-pattern", "T1c*", "--flair-pattern",
            "Flair*", "--seg-pattern", "seg*", "--json"]
    assert main(argv) == 0
    assert '"layout": "named"' in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "check.json")]) == 0  # --json FILE: table and file
    assert "caseA" in capsys.readouterr().out
    assert json.loads((tmp_path / "check.json").read_text())[0]["layout"] == "named"


def test_cli_check_marks_a_case_with_an_ambiguous_pattern_bad_and_checks_the_others(
        renamed, tmp_path, capsys):
    from fuse4seg.cli import main

    root, _ = renamed
    data = tmp_path / "two"
    shutil.copytree(root / "caseA", data / "good")
    shutil.copytree(root / "caseA", data / "extra")
    shutil.copy(root / "caseA" / "T1c.nii.gz", data / "extra" / "T1c_old.nii.gz")
    argv = ["data", "check", str(data), "--t1ce-pattern", "T1c*", "--flair-pattern", "Flair*",
            "--seg-pattern", "seg*"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "1 good, 1 bad" in captured.out
    assert ("bad case extra: --t1ce-pattern 'T1c*' matches 2 files" in captured.err
            and "T1c_old.nii.gz" in captured.err)


def test_cli_a_folder_that_no_image_pattern_matches_is_a_bad_case_that_skip_bad_leaves_out(
        renamed, tmp_path, capsys):
    from fuse4seg.cli import main

    root, _ = renamed
    data = tmp_path / "two"
    shutil.copytree(root / "caseA", data / "good")
    (data / "labels_only").mkdir()
    shutil.copy(root / "caseA" / "segmentation.nii.gz", data / "labels_only" / "seg.nii.gz")
    patterns = ["--t1ce-pattern", "T1c*", "--flair-pattern", "Flair*", "--seg-pattern", "seg*"]
    assert main(["data", "check", str(data), *patterns]) == 1
    captured = capsys.readouterr()
    assert "1 good, 1 bad" in captured.out
    assert "bad case labels_only: --t1ce-pattern 'T1c*' matches no file" in captured.err
    # stopped at the bad case, it suggests the `data check` that finds the same cases
    with pytest.raises(DataError) as info:
        prepare_cache(data, tmp_path / "stopped", get_config("smoke").data, progress=False,
                      patterns={"t1ce": "T1c*", "flair": "Flair*", "seg": "seg*"})
    assert (f"`fuse4seg data check {data} --t1ce-pattern 'T1c*' --flair-pattern 'Flair*' "
            "--seg-pattern 'seg*'` lists every bad case") in str(info.value)
    assert (f"`fuse4seg data prepare {data} --t1ce-pattern 'T1c*' --flair-pattern 'Flair*' "
            f"--seg-pattern 'seg*' --out {tmp_path / 'stopped'} --skip-bad`, with the same "
            "--profile and --set, prepares the others)") in str(info.value)
    # from train or study (their --cache): the raw --data would stop again, so they are told
    # to train on the cache that command writes
    with pytest.raises(DataError) as info:
        prepare_cache(data, tmp_path / "c", get_config("smoke").data, progress=False,
                      patterns={"t1ce": "T1c*", "flair": "Flair*", "seg": "seg*"}, flag="--cache")
    assert str(info.value).endswith(f"--out {tmp_path / 'c'} --skip-bad`, with the same "
                                    "--profile and --set, prepares the others, and `--data "
                                    f"{tmp_path / 'c'}` then trains on them)")
    out = tmp_path / "cache"
    with pytest.warns(UserWarning, match="--skip-bad: left out 1 bad case"):
        assert main(["data", "prepare", str(data), "--out", str(out), "--profile", "smoke",
                     "--skip-bad", *patterns]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"] == ["good"] and "labels_only" in json.dumps(manifest["skipped"])


def test_a_named_case_without_a_recognised_segmentation_says_which_words_it_looked_for(
        renamed, tmp_path, capsys):
    """A segmentation called ``roi`` is no ``seg`` word: the error lists the words and the
    pattern flag that names the file instead, in ``load_case`` and in ``data check``."""
    from fuse4seg.cli import main

    root, _ = renamed
    case = tmp_path / "p7"
    _copy(root / "caseA" / "T1c.nii.gz", case / "p7_T1c.nii.gz")
    _copy(root / "caseA" / "Flair.nii.gz", case / "p7_Flair.nii.gz")
    _copy(root / "caseA" / "segmentation.nii.gz", case / "p7_roi.nii.gz")
    (found,) = find_cases(case)
    assert found.layout == "named"
    with pytest.raises(DataError, match=r"case p7: missing segmentation file: no NIfTI file "
                       r"with one of the words seg, segmentation, label, .*ground_truth in its "
                       r"name in its folder \(named layout\); rename the file, or give "
                       r"--seg-pattern"):
        load_case(found)
    assert main(["data", "check", str(case), "--t1ce-pattern", "*T1c*"]) == 1
    assert "or give --seg-pattern" in capsys.readouterr().out
    assert main(["data", "check", str(case), "--seg-pattern", "*roi*"]) == 0


def test_cli_check_shows_the_scheme_and_notes_a_named_case_read_as_brats2023(
        renamed, tmp_path, capsys):
    """A named case's label scheme is guessed from its values; a 3 without a 4 reads as
    BraTS 2023+'s ET, which a BRATS 2013/2015 map without enhancing tumour would be read as
    too (its 3 is non-enhancing tumour): the table shows the scheme and a note says so (a
    review found the guess silent)."""
    from fuse4seg.cli import main

    root, _ = renamed
    data = tmp_path / "three"
    shutil.copytree(root / "caseA", data / "caseA")
    shutil.copytree(root / "caseA", data / "caseC")
    seg = nib.load(data / "caseC" / "segmentation.nii.gz")
    labels = np.asarray(seg.dataobj).copy()
    labels[labels == 4] = 3  # 0-3: BraTS 2023+, or 2013/2015 without enhancing tumour
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), data / "caseC" / "seg.nii.gz")
    (data / "caseC" / "segmentation.nii.gz").unlink()
    assert main(["data", "check", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["case", "layout", "scheme"]
    rows = {line.split()[0]: line.split() for line in out[1:3]}
    assert rows["caseA"][1:3] == ["named", "brats2021"]
    assert rows["caseC"][1:3] == ["named", "brats2023"]
    assert rows["caseC"][-1] == rows["caseA"][-1] != "0"  # the ET voxels, read as ET
    assert out[-1].startswith("note: 1 named case(s) (caseC) have labels 1-3 and no 4, read "
                              "as BraTS 2023+ (3 = enhancing tumour)")
