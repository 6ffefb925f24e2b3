"""The MNI152 phantom (fuse4seg.data.phantom): layout, determinism, contrast model, CLI."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fuse4seg.cli import main as cli_main
from fuse4seg.data import phantom
from fuse4seg.data.phantom import BRATS_SHAPE, CONTRAST, case_id, case_seed

IDS = [case_id(i) for i in range(3)]  # conftest's phantom_dir: 3 cases, seed 0


def _load(folder: Path, name: str):
    img = nib.load(folder / f"{folder.name}_{name}.nii.gz")
    return img, np.asarray(img.dataobj)


def test_case_ids_and_seeds():
    assert case_id(0) == "Phantom_00000"
    assert case_id(123) == "Phantom_00123"
    assert case_seed(0, 2) == 2
    assert case_seed(3, 4) == 3 * 100003 + 4


def test_layout_shape_affine_dtypes(phantom_dir):
    assert sorted(p.name for p in phantom_dir.iterdir()) == IDS
    for cid in IDS:
        folder = phantom_dir / cid
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{cid}_{m}.nii.gz" for m in ("t1ce", "flair", "seg")
        )  # no temporary files left behind
        ref_affine = None
        for name, dtype in (("t1ce", np.int16), ("flair", np.int16), ("seg", np.uint8)):
            img, data = _load(folder, name)
            assert data.shape == BRATS_SHAPE
            assert data.dtype == dtype
            assert img.get_data_dtype() == dtype
            assert np.allclose(img.header.get_zooms()[:3], 1.0)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
            if ref_affine is None:
                ref_affine = img.affine
            np.testing.assert_array_equal(img.affine, ref_affine)
        # world coordinates are MNI mm: the origin (AC) lies inside the brain
        ijk = np.rint(np.linalg.inv(ref_affine) @ [0, 0, 0, 1])[:3].astype(int)
        _, t1ce = _load(folder, "t1ce")
        assert t1ce[tuple(ijk)] > 0


def test_labels_all_regions_present_and_background_zero(phantom_dir):
    for cid in IDS:
        folder = phantom_dir / cid
        _, seg = _load(folder, "seg")
        _, t1ce = _load(folder, "t1ce")
        _, flair = _load(folder, "flair")
        values, counts = np.unique(seg, return_counts=True)
        assert values.tolist() == [0, 1, 2, 4], cid  # BraTS 2021: NCR 1, ED 2, ET 4
        assert counts[1:].min() >= 100, cid
        brain = t1ce > 0
        np.testing.assert_array_equal(brain, flair > 0)  # same skull-stripped brain
        assert brain[seg > 0].all()  # tumour inside the brain
        assert 1.2e6 < brain.sum() < 2.6e6  # an adult brain, ~1.5 l at 1 mm
        assert t1ce.min() == 0 and flair.min() == 0


def test_cases_differ(phantom_dir):
    _, seg0 = _load(phantom_dir / IDS[0], "seg")
    _, seg1 = _load(phantom_dir / IDS[1], "seg")
    _, t0 = _load(phantom_dir / IDS[0], "t1ce")
    _, t1 = _load(phantom_dir / IDS[1], "t1ce")
    assert not np.array_equal(seg0, seg1)
    assert not np.array_equal(t0 > 0, t1 > 0)  # the anatomy is deformed differently


def _region_means(folder: Path) -> dict[str, dict[str, float]]:
    """Mean T1ce / FLAIR of each tumour region and of normal white matter."""
    _, seg = _load(folder, "seg")
    out = {}
    for name in ("t1ce", "flair"):
        _, img = _load(folder, name)
        img = img.astype(np.float64)
        means = {r: img[seg == v].mean() for r, v in (("NCR", 1), ("ED", 2), ("ET", 4))}
        # normal white matter: the brightest third of the normal brain on T1ce is mostly WM
        out[name] = means
    _, t1ce = _load(folder, "t1ce")
    _, flair = _load(folder, "flair")
    normal = (t1ce > 0) & (seg == 0)
    wm_like = normal & (t1ce > np.percentile(t1ce[normal], 70))
    out["t1ce"]["WM"] = t1ce[wm_like].mean()
    out["flair"]["WM"] = flair[wm_like].astype(np.float64).mean()
    return out


def test_contrast_model(phantom_dir):
    for cid in IDS:
        m = _region_means(phantom_dir / cid)
        t1ce, flair = m["t1ce"], m["flair"]
        # T1ce: enhancing rim brighter than edema and than WM; necrosis darkest
        assert t1ce["ET"] > 1.4 * t1ce["ED"], (cid, t1ce)
        assert t1ce["ET"] > 1.3 * t1ce["WM"], (cid, t1ce)
        assert t1ce["NCR"] < 0.7 * t1ce["ED"], (cid, t1ce)
        assert t1ce["NCR"] < 0.6 * t1ce["WM"], (cid, t1ce)
        # T1ce hardly shows edema (within 30 % of WM)
        assert abs(t1ce["ED"] / t1ce["WM"] - 1) < 0.3, (cid, t1ce)
        # FLAIR: edema (and the whole tumour) bright relative to normal white matter
        for region in ("ED", "NCR", "ET"):
            assert flair[region] > 1.5 * flair["WM"], (cid, region, flair)
        # FLAIR does not separate the sub-regions as T1ce does
        assert max(flair.values()) / min(flair[r] for r in ("NCR", "ED", "ET")) < 1.4


def test_contrast_table_matches_docstring():
    """Each tissue's row of the docstring's table gives that tissue's two values."""
    import re

    doc = phantom.__doc__
    rows = {"CSF": "CSF", "GM": "grey matter", "WM": "white matter", "ED": r"edema \(ED, 2\)",
            "NCR": r"necrosis \(NCR, 1\)", "ET": r"enhancing \(ET, 4\)"}
    assert sorted(rows) == sorted(CONTRAST)
    for tissue, (t1ce, flair) in CONTRAST.items():
        row = re.search(rf"^ *{rows[tissue]} +([\d.]+) +([\d.]+) ", doc, re.MULTILINE)
        assert row is not None, f"no row for {tissue} in the docstring's table"
        assert row.groups() == (f"{t1ce:.2f}", f"{flair:.2f}"), tissue
    assert CONTRAST["ET"][0] > CONTRAST["WM"][0] > CONTRAST["ED"][0] > CONTRAST["NCR"][0]
    assert CONTRAST["ED"][1] > CONTRAST["GM"][1] > CONTRAST["WM"][1] > CONTRAST["CSF"][1]


def test_bspline_partition_of_unity():
    # hand values: B3(0) = 4/6, B3(±1) = 1/6, B3(±2) = 0
    np.testing.assert_allclose(
        phantom._bspline3(np.array([0.0, 1.0, -1.0, 2.0])), [2 / 3, 1 / 6, 1 / 6, 0]
    )
    basis = phantom._basis(50, 8.0)
    np.testing.assert_allclose(basis.sum(axis=1), 1.0, atol=1e-12)


def test_smooth_field_unit_variance_and_deterministic():
    a = phantom._smooth_field(np.random.default_rng(1), (40, 30, 20), 6.0)
    b = phantom._smooth_field(np.random.default_rng(1), (40, 30, 20), 6.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 30, 20) and a.dtype == np.float32
    # many independent draws: the pointwise variance is 1
    draws = np.stack(
        [phantom._smooth_field(np.random.default_rng(s), (9, 9, 9), 3.0) for s in range(400)]
    )
    assert abs(draws.var(axis=0).mean() - 1.0) < 0.1


def test_cli_determinism_byte_identical_overwrite(tmp_path, phantom_dir, capsys):
    # case 0's files, stale, are overwritten by the CLI with the same seed: the session
    # fixture's bytes, no temp files
    out = tmp_path / "again"
    shutil.copytree(phantom_dir / IDS[0], out / IDS[0])
    for stale in (out / IDS[0]).iterdir():
        stale.write_bytes(b"stale")
    assert cli_main(["data", "phantom", "--out", str(out), "--cases", "1", "--seed", "0"]) == 0
    assert "wrote 1 phantom cases" in capsys.readouterr().out
    names = sorted(f"{IDS[0]}_{m}.nii.gz" for m in ("t1ce", "flair", "seg"))
    assert sorted(p.name for p in (out / IDS[0]).iterdir()) == names
    for fname in names:
        assert (out / IDS[0] / fname).read_bytes() == (phantom_dir / IDS[0] / fname).read_bytes()
    # fewer cases than the folder holds: the extra case is named, not silently kept
    shutil.copytree(phantom_dir / IDS[1], out / IDS[1])
    with pytest.warns(UserWarning, match=f"also holds 1 other phantom case folder\\(s\\) "
                                         f"\\({IDS[1]}\\), so it is a dataset of 2 cases, not 1"):
        assert cli_main(["data", "phantom", "--out", str(out), "--cases", "1"]) == 0


@pytest.mark.parametrize("make, what", [
    (lambda d: (d / "manifest.json").write_text("{}"), "a prepared slice cache (manifest.json)"),
    (lambda d: (d / "fuse4seg-smoke-1234abcd").mkdir() or
     (d / "fuse4seg-smoke-1234abcd" / "run.json").write_text("{}"),
     "a run or a runs folder (run.json)"),
    (lambda d: (d / "BraTS2021_00006").mkdir() or
     (d / "BraTS2021_00006" / "BraTS2021_00006_t1ce.nii.gz").write_bytes(b""),
     "other cases (BraTS2021_00006)"),
])
def test_the_phantom_is_not_written_into_a_cache_a_runs_folder_or_other_cases(
        make, what, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli_main(["data", "phantom", "--out", str(out), "--cases", "1", "--quiet"]) == 2
    assert (f"fuse4seg: error: phantom output {out} holds {what}: write the phantom to a "
            "folder of its own") in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_workers_write_the_same_bytes(tmp_path, phantom_dir):
    # two processes, two cases: the files of one worker (the session fixture), in case order.
    # In a child process, so that this pytest worker never forks a pool before it runs the
    # smoke book's kernels (a pool was once suspected of chapter 01's hang, whose cause was
    # later found in the slice viewer's Output widget; the isolation costs nothing)
    out = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "fuse4seg", "data", "phantom", "--out", str(out), "--cases", "2",
         "--workers", "2"], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert err.index("phantom 1/2: " + IDS[0]) < err.index("phantom 2/2: " + IDS[1])
    for cid in IDS[:2]:
        for m in ("t1ce", "flair", "seg"):
            name = f"{cid}_{m}.nii.gz"
            assert (out / cid / name).read_bytes() == (phantom_dir / cid / name).read_bytes()
    with pytest.raises(ValueError, match="workers"):
        phantom.write_phantom_dataset(tmp_path / "none", cases=1, workers=0)


def test_lead_loader_reads_the_phantom(phantom_dir):
    from fuse4seg.data import layouts
    cases = layouts.find_cases(phantom_dir)
    assert [c.case_id for c in cases] == IDS
    assert {c.layout for c in cases} == {"brats2021"}
    case = layouts.load_case(phantom_dir / IDS[0])
    assert case.scheme == "brats2021"
    assert sorted(np.unique(case.seg).tolist()) == [0, 1, 2, 3]  # ET 4 -> canonical 3
    _, t1ce = _load(phantom_dir / IDS[0], "t1ce")
    np.testing.assert_array_equal(case.t1ce, t1ce.astype(np.float32))


def test_make_phantom_case_arrays_match_files(phantom_dir):
    case = phantom.make_phantom_case(case_seed(0, 1))
    assert set(case) == {"t1ce", "flair", "seg", "affine"}
    for name in ("t1ce", "flair", "seg"):
        img, data = _load(phantom_dir / IDS[1], name)
        np.testing.assert_array_equal(case[name], data)
        assert case[name].dtype == data.dtype
    np.testing.assert_array_equal(case["affine"], img.affine)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "0"], "argument --cases: must be at least 1, got 0"),  # argparse's
        (["--cases", "-3"], "argument --cases: must be at least 1, got -3"),
        (["--seed", "-1"], "argument --seed: a seed must be >= 0, got -1"),  # as every seed
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    try:
        status = cli_main(["data", "phantom", "--out", str(out), *argv])
    except SystemExit as exit_info:  # refused while parsing (cli.positive_int, cli.seed_int)
        status = exit_info.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    # called from Python, the writer refuses them itself, before writing anything
    name, value = argv[0].removeprefix("--"), int(argv[1])
    with pytest.raises(ValueError, match=f"write_phantom_dataset: {name} must be"):
        phantom.write_phantom_dataset(out, **{name: value}, progress=False)
    assert not out.exists()


def test_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        phantom.write_phantom_dataset(target, cases=1)


def test_bad_seed_type():
    with pytest.raises(ValueError, match="seed"):
        phantom.make_phantom_case(-1)
    with pytest.raises(ValueError, match="seed"):
        phantom.make_phantom_case(1.5)


def test_data_script_bad_cases(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "data_scripts" / "make_phantom.py"
    spec = importlib.util.spec_from_file_location("make_phantom", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(tmp_path / "x"), "--cases", "0"])
    assert exit_info.value.code == 2
    assert "argument --cases: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_anatomy_is_offline(monkeypatch):
    """The MNI152 maps come from inside the nilearn wheel: no network access at all."""

    def no_network(*args, **kwargs):
        raise AssertionError("the phantom tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    phantom._anatomy.cache_clear()
    anat = phantom._anatomy()
    assert anat.gm.shape == anat.wm.shape == anat.brain.shape
    # the brain fills the 155 axial slices of the BraTS grid, centred in-plane
    assert anat.brain.shape[2] == BRATS_SHAPE[2]
    csf = np.clip(anat.brain - anat.gm - anat.wm, 0, 1)
    assert 0.05 < csf[anat.brain > 0].mean() < 0.4


def test_a_stopped_phantom_leaves_no_smaller_dataset(tmp_path, monkeypatch):
    """Ctrl-C part-way (a review found one case of four left, which `data check` passed as a
    whole dataset): the case folders and the folder chain this call made are removed; a case
    folder that was there before stays."""
    import fuse4seg.data.phantom as phantom

    real = phantom._write_case

    def stopped(job):
        out_dir, seed, i = job
        if i == 1:  # half a case on disk, then the interrupt
            (Path(out_dir) / phantom.case_id(1)).mkdir(parents=True)
            (Path(out_dir) / phantom.case_id(1) / "part.nii.gz").write_bytes(b"x")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(phantom, "_write_case", stopped)
    out = tmp_path / "new" / "phantom"
    with pytest.raises(KeyboardInterrupt):
        phantom.write_phantom_dataset(out, cases=3, progress=False)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(phantom, "_write_case", real)
    phantom.write_phantom_dataset(out, cases=1, progress=False)
    before = (out / "Phantom_00000" / "Phantom_00000_seg.nii.gz").read_bytes()
    monkeypatch.setattr(phantom, "_write_case", stopped)
    with pytest.raises(KeyboardInterrupt):
        phantom.write_phantom_dataset(out, cases=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["Phantom_00000"]
    assert (out / "Phantom_00000" / "Phantom_00000_seg.nii.gz").read_bytes() == before
