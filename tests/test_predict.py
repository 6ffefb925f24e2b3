"""``predict`` and ``evaluate``: affine, header and label scheme round-trip; clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fuse4seg.cli import main
from fuse4seg.config import get_config
from fuse4seg.inference import load_bundle
from fuse4seg.models import build_leader
from fuse4seg.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from fuse4seg.train.methods import build_follower


def _make_run(folder: Path, method: str = "fuse4seg", favour: int | None = None) -> Path:
    """A run folder with an untrained bundle; ``favour`` makes the follower predict one class
    everywhere (zero weights, a large bias on the last 4-channel conv)."""
    config = get_config("smoke")
    torch.manual_seed(0)
    leader = build_leader(config) if method in ("fuse4seg", "disjoint_ae") else None
    follower = build_follower(config, method)
    if favour is not None:
        head = [
            m for m in follower.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 4
        ][-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
            head.bias[favour] = 100.0
    bundle = {
        "format": CHECKPOINT_FORMAT,
        "kind": "bundle",
        "method": method,
        "config": config.to_dict(),
        "epoch": 2,
        "leader": leader.state_dict() if leader is not None else None,
        "follower": follower.state_dict(),
        "scheme": "brats2021",
    }
    run = folder / f"{method}-smoke-test"
    save_checkpoint(run / "checkpoints" / "best.pt", bundle)
    return run


def _case_files(case_dir: Path) -> tuple[Path, Path]:
    t1ce = next(case_dir.glob("*_t1ce.nii*"))
    flair = next(case_dir.glob("*_flair.nii*"))
    return t1ce, flair


def _predict(run, t1ce, flair, out, *extra: object) -> int:
    """``fuse4seg predict`` through the CLI entry point; returns the exit status."""
    args = ["--checkpoint", run, "--t1ce", t1ce, "--flair", flair, "--out", out, *extra]
    return main(["predict", *map(str, args)])


@pytest.mark.slow
def test_predict_round_trips_affine_and_scheme(phantom_dir, tmp_path, capsys):
    run = _make_run(tmp_path, favour=3)  # every brain voxel ET
    case = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    t1ce, flair = _case_files(case)
    out = tmp_path / "pred"
    assert _predict(run, t1ce, flair, out, "--device", "cpu") == 0
    # the summary gives each class's value in the written file: ET is 4 in BraTS 2021
    printed = capsys.readouterr().out
    assert "labels in seg.nii.gz (brats2021 scheme), voxels: background = 0: " in printed
    assert ", ET = 4: " in printed
    src = nib.load(str(t1ce))
    fused, seg = nib.load(str(out / "fused.nii.gz")), nib.load(str(out / "seg.nii.gz"))
    for image in (fused, seg):
        assert image.shape == src.shape
        np.testing.assert_allclose(image.affine, src.affine)
        np.testing.assert_allclose(image.header.get_zooms(), src.header.get_zooms())
    f = np.asarray(fused.dataobj)
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    s = np.asarray(seg.dataobj)
    brain = (np.asarray(src.dataobj) != 0) | (np.asarray(nib.load(str(flair)).dataobj) != 0)
    assert set(np.unique(s[brain])) <= {4} and set(np.unique(s[~brain])) == {0}
    assert (s[brain] == 4).mean() > 0.9  # ET is 4 in the BraTS 2021 scheme

    out3 = tmp_path / "pred2023"
    assert _predict(run, t1ce, flair, out3, "--scheme", "brats2023") == 0
    assert ", ET = 3: " in capsys.readouterr().out
    s3 = np.asarray(nib.load(str(out3 / "seg.nii.gz")).dataobj)
    assert set(np.unique(s3)) <= {0, 3} and 3 in s3


class _BrightFollower(torch.nn.Module):
    """Labels that follow the input's anatomy: ET where x_avg > 0.6 (the phantom's lesions and
    the brightest tissue), background elsewhere."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 3] = 10.0 * (x[:, 0] > 0.6)
        return logits


def test_predict_puts_each_label_where_its_voxels_are(phantom_dir, tmp_path, monkeypatch):
    """A review found that a transposed and flipped label map passed every predict test: their
    followers predict one class everywhere. Here the follower labels a rule of x_avg, so
    seg.nii.gz must match that rule applied to the input volumes on their own grid (Dice above
    0.7 after the profile's 4x down-sampling and back), and not its transpose."""
    import dataclasses

    import fuse4seg.inference as inference
    from fuse4seg.data.layouts import normalize_intensity

    real_load = inference.load_bundle

    def with_rule(*args, **kwargs):
        return dataclasses.replace(real_load(*args, **kwargs), follower=_BrightFollower())

    monkeypatch.setattr(inference, "load_bundle", with_rule)
    run = _make_run(tmp_path, method="average")
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    out = tmp_path / "pred"
    assert _predict(run, t1ce, flair, out, "--device", "cpu") == 0
    seg = np.asarray(nib.load(str(out / "seg.nii.gz")).dataobj)
    a, b = (np.asarray(nib.load(str(f)).dataobj, np.float32) for f in (t1ce, flair))
    brain = (a != 0) | (b != 0)
    pct = get_config("smoke").data.intensity_percentiles
    x_avg = 0.5 * (normalize_intensity(a, brain, pct) + normalize_intensity(b, brain, pct))
    want = (x_avg > 0.6) & brain

    def dice(p, t):
        return 2 * (p & t).sum() / (p.sum() + t.sum())

    got = seg == 4  # ET in the BraTS 2021 scheme
    assert set(np.unique(seg)) == {0, 4} and want.sum() > 1000
    right, turned = dice(got, want), dice(got, want.transpose(1, 0, 2)[:, ::-1])
    assert right > 0.7 and turned < 0.5 * right, (right, turned)


def test_predict_clears_the_inputs_display_window_and_names_its_checkpoint(phantom_dir, tmp_path,
                                                                           capsys, monkeypatch):
    """A T1ce header with a display window (cal_max 2000) and an intent: the outputs keep the
    grid but not those fields, which describe the input's intensities; the checkpoint used is
    printed; --which with a checkpoint file is refused by name."""
    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    src = nib.load(str(t1ce))
    header = src.header.copy()
    header["cal_min"], header["cal_max"] = 0.0, 2000.0
    header.set_intent("estimate")
    windowed = tmp_path / "in_t1ce.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), src.affine, header), str(windowed))
    out = tmp_path / "o"
    assert _predict(run, windowed, flair, out, "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {run / 'checkpoints' / 'best.pt'} (epoch 2)" in printed
    fused, seg = nib.load(str(out / "fused.nii.gz")), nib.load(str(out / "seg.nii.gz"))
    for image, intent in ((fused, "none"), (seg, "label")):
        assert float(image.header["cal_min"]) == 0.0 and float(image.header["cal_max"]) == 0.0
        assert image.header.get_intent()[0] == intent
        np.testing.assert_allclose(image.affine, src.affine)
    best = run / "checkpoints" / "best.pt"
    from fuse4seg.data import layouts

    with monkeypatch.context() as patch:  # refused before any volume is read
        patch.setattr(layouts, "load_volume", lambda *a, **k: pytest.fail("volume read"))
        assert _predict(best, windowed, flair, tmp_path / "o2", "--which", "ema") == 2
    err = capsys.readouterr().err
    assert f"--which ema: {best} is a checkpoint file" in err
    assert not (tmp_path / "o2").exists()
    # a folder where a file goes, a file where the folder goes: said as such
    assert _predict(run, tmp_path, flair, tmp_path / "o3") == 2
    assert f"--t1ce {tmp_path}: is a folder" in capsys.readouterr().err
    assert _predict(run, windowed, flair, windowed) == 2
    assert f"--out {windowed}: is a file, not a folder" in capsys.readouterr().err


def test_which_with_a_checkpoint_file_is_refused_by_evaluate_too(phantom_dir, tmp_path, capsys):
    """The check lives where the checkpoint is chosen, so every caller gets it."""
    from fuse4seg.inference import _checkpoint_path

    run = _make_run(tmp_path)
    best = run / "checkpoints" / "best.pt"
    assert main(["evaluate", str(best), "--data", str(phantom_dir), "--which", "last"]) == 2
    assert f"--which last: {best} is a checkpoint file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a checkpoint file"):
        load_bundle(best, which="best")
    assert _checkpoint_path(best) == best and _checkpoint_path(run) == best
    with pytest.raises(ValueError, match="choose best, ema or last"):
        _checkpoint_path(run, "newest")


def test_a_stopped_predict_removes_the_folders_it_made(phantom_dir, tmp_path, capsys,
                                                       monkeypatch):
    import fuse4seg.inference as inference

    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "predict_volume", stop)
    (tmp_path / "kept").mkdir()
    assert _predict(run, t1ce, flair, tmp_path / "kept" / "a" / "b" / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_predict_stopped_while_writing_leaves_no_new_file_and_no_folder(
        phantom_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C between the two files: no new file is left (never a new fused.nii.gz beside an
    old seg.nii.gz), nor the folders the call made; a stop while the volumes are encoded also
    removes the folders."""
    import fuse4seg.inference as inference
    import fuse4seg.utils as utils

    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    real_write = utils._write_temp
    calls = []

    def write_then_stop(path, write):
        calls.append(Path(path).name)
        if len(calls) == 2:  # the second file (seg.nii.gz): stopped before it is written
            raise KeyboardInterrupt
        return real_write(path, write)

    monkeypatch.setattr(utils, "_write_temp", write_then_stop)
    (tmp_path / "kept").mkdir()
    assert _predict(run, t1ce, flair, tmp_path / "kept" / "a" / "out") == 130
    assert calls == ["fused.nii.gz", "seg.nii.gz"]
    assert "interrupted" in capsys.readouterr().err
    assert not any((tmp_path / "kept").iterdir())
    # into a folder that holds an earlier prediction: the old segmentation stays alone
    old = tmp_path / "old"
    old.mkdir()
    (old / "seg.nii.gz").write_bytes(b"an earlier segmentation")
    calls.clear()
    assert _predict(run, t1ce, flair, old) == 130
    assert sorted(p.name for p in old.iterdir()) == ["seg.nii.gz"]
    assert (old / "seg.nii.gz").read_bytes() == b"an earlier segmentation"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "_nifti_bytes", stop)
    assert _predict(run, t1ce, flair, tmp_path / "kept" / "b" / "out") == 130
    assert not any((tmp_path / "kept").iterdir())


@pytest.mark.slow
def test_predict_two_channel_method_writes_only_the_segmentation(phantom_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import fuse4seg.utils as utils

    run = _make_run(tmp_path, method="direct2ch")
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    assert _predict(run, t1ce, flair, tmp_path / "o") == 0
    assert (tmp_path / "o" / "seg.nii.gz").exists()
    assert not (tmp_path / "o" / "fused.nii.gz").exists()
    # into a folder where a fusion method wrote before: its fused.nii.gz does not stay beside
    # this model's segmentation
    assert _predict(_make_run(tmp_path / "f"), t1ce, flair, tmp_path / "both") == 0
    assert (tmp_path / "both" / "fused.nii.gz").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "both").iterdir()}
    capsys.readouterr()
    # seg.nii.gz cannot be written: the earlier pair stays as it was, fused.nii.gz included
    real_write = utils._write_temp

    def refuse_seg(path, write):
        if Path(path).name == "seg.nii.gz":
            raise OSError(28, "No space left on device")
        return real_write(path, write)

    monkeypatch.setattr(utils, "_write_temp", refuse_seg)
    assert _predict(run, t1ce, flair, tmp_path / "both") == 2
    assert "cannot write seg.nii.gz (No space left on device)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "both").iterdir()} == before
    monkeypatch.setattr(utils, "_write_temp", real_write)
    assert _predict(run, t1ce, flair, tmp_path / "both") == 0
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["seg.nii.gz"]
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'both' / 'fused.nii.gz'} (an earlier model's" in out


def test_predict_refuses_a_constant_background_and_an_unwritable_out(phantom_dir, tmp_path,
                                                                     capsys, monkeypatch):
    import fuse4seg.inference as inference

    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    # z-scored like BRATS 2013/2015: the background is a constant below zero, not zero
    image = nib.load(str(t1ce))
    data = np.asarray(image.dataobj, dtype=np.float32)
    zscored = tmp_path / "z_t1c.nii.gz"
    nib.save(nib.Nifti1Image(np.where(data == 0, -4.76, data), image.affine), str(zscored))
    flair_z = tmp_path / "z_flair.nii.gz"
    data_f = np.asarray(nib.load(str(flair)).dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.where(data_f == 0, -4.76, data_f), image.affine), str(flair_z))
    assert _predict(run, zscored, flair_z, tmp_path / "z") == 2
    err = capsys.readouterr().err
    assert "would be the whole volume" in err and "--mask" in err and "z_t1c.nii.gz" in err
    assert not (tmp_path / "z").exists()
    # an --out that cannot be written is found before the model runs
    monkeypatch.setattr(inference, "predict_volume", lambda *a, **k: pytest.fail("model ran"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert _predict(run, t1ce, flair, blocker / "out") == 2
    assert "--out" in capsys.readouterr().err


def test_predict_rejects_bad_inputs(phantom_dir, tmp_path, capsys):
    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    image = nib.load(str(flair))
    data = np.asarray(image.dataobj, dtype=np.float32)
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(data[:-2], image.affine), str(small))
    moved = tmp_path / "moved.nii.gz"
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(data, shifted), str(moved))
    four_d = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], image.affine), str(four_d))
    zeros = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), image.affine), str(zeros))
    cases = [
        (zeros, "zeros.nii.gz: the same value (0) in every brain voxel"),
        (small, "shape mismatch"),
        (moved, "affine mismatch"),
        (four_d, "3-D"),
        (tmp_path / "missing.nii.gz", "no such file"),
    ]
    for bad, message in cases:
        code = _predict(run, t1ce, bad, tmp_path / "x")
        assert code == 2
        assert message in capsys.readouterr().err
    # one volume given twice, by the same path or as a copy
    assert _predict(run, t1ce, t1ce, tmp_path / "x") == 2
    assert "--t1ce and --flair are the same file" in capsys.readouterr().err
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(t1ce.read_bytes())
    assert _predict(run, t1ce, copy, tmp_path / "x") == 2
    assert "hold the same voxels" in capsys.readouterr().err
    # the outputs never land among the case's own files (its ground truth, in BraTS)
    assert _predict(run, t1ce, flair, t1ce.parent) == 2
    assert f"--out {t1ce.parent}: the folder of --t1ce" in capsys.readouterr().err
    assert not (t1ce.parent / "seg.nii.gz").exists()
    assert _predict(tmp_path / "norun", t1ce, flair, tmp_path / "x") == 2
    assert "no such run folder" in capsys.readouterr().err
    fusion_only = tmp_path / "leader.pt"  # what `fuse4seg fusion train` writes
    save_checkpoint(fusion_only, {"format": CHECKPOINT_FORMAT, "kind": "fusion_leader",
                                  "config": get_config("smoke").to_dict(), "leader": {}})
    assert _predict(fusion_only, t1ce, flair, tmp_path / "x") == 2
    assert "a fusion-only leader" in capsys.readouterr().err
    fusion_run = tmp_path / "fusion-PET-MRI-smoke-x"  # a `fusion train` run folder
    save_checkpoint(fusion_run / "checkpoints" / "leader.pt", {"leader": {}})
    assert _predict(fusion_run, t1ce, flair, tmp_path / "x") == 2
    assert "a fusion-only run (checkpoints/leader.pt)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_predict_with_a_brain_mask(phantom_dir, tmp_path):
    run = _make_run(tmp_path, favour=2)  # every brain voxel ED
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    image = nib.load(str(t1ce))
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[100:140, 100:140, 60:90] = 1
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, image.affine), str(mask_path))
    out = tmp_path / "o"
    assert _predict(run, t1ce, flair, out, "--mask", mask_path) == 0
    seg = np.asarray(nib.load(str(out / "seg.nii.gz")).dataobj)
    assert set(np.unique(seg[mask == 0])) == {0}
    assert (seg[mask == 1] == 2).mean() > 0.9
    # a label map given as --mask is said (its voxels above 0.5 are still the brain)
    labels = tmp_path / "labels.nii.gz"
    label_map = mask * np.uint8(4)
    label_map[110:120, 100:140, 60:90] = 2  # ED inside ET: 0/2/4, as a BraTS seg
    nib.save(nib.Nifti1Image(label_map, image.affine), str(labels))
    with pytest.warns(UserWarning, match=r"--mask .*labels.nii.gz: 2 non-zero values .*not a "
                                         r"binary mask; is it a label map\?"):
        assert _predict(run, t1ce, flair, tmp_path / "o2", "--mask", labels) == 0


def test_a_mask_that_never_passes_one_half_is_named(phantom_dir, tmp_path, capsys):
    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    image = nib.load(str(t1ce))
    half = tmp_path / "half.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 0.5, np.float32), image.affine), str(half))
    assert _predict(run, t1ce, flair, tmp_path / "h", "--mask", half) == 2
    assert f"--mask {half}: no voxel above 0.5" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_on_a_real_brats2013_case_uses_its_brain_mask(brats2013_dir, tmp_path, capsys):
    import shutil

    run = _make_run(tmp_path, favour=2)  # every brain voxel ED
    case = sorted(p for p in brats2013_dir.iterdir() if p.is_dir())[0]
    t1ce, flair = next(case.glob("T1c*.nii.gz")), next(case.glob("Flair*.nii.gz"))
    assert _predict(run, t1ce, flair, tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert f"brain mask: {case / 'brainmask.nii.gz'}" in out and "brats2013 scheme" in out
    seg = np.asarray(nib.load(str(tmp_path / "o" / "seg.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(case / "brainmask.nii.gz")).dataobj) > 0.5
    assert (seg > 0).sum() == mask.sum() and not seg[~mask].any()
    # the same volumes without their mask: the z-scored background is not zero, so the
    # default mask would be the whole volume, and predict refuses instead of segmenting it
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(t1ce, bare / t1ce.name)
    shutil.copy(flair, bare / flair.name)
    assert _predict(run, bare / t1ce.name, bare / flair.name, tmp_path / "b") == 2
    assert "would be the whole volume" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_on_the_real_brats2021_case(brats2021_case, tmp_path):
    run = _make_run(tmp_path, favour=3)
    t1ce, flair = _case_files(brats2021_case)
    out = tmp_path / "pred"
    assert _predict(run, t1ce, flair, out) == 0
    src = nib.load(str(t1ce))
    seg = nib.load(str(out / "seg.nii.gz"))
    assert seg.shape == src.shape == (240, 240, 155)
    np.testing.assert_allclose(seg.affine, src.affine)
    assert seg.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
    assert set(np.unique(np.asarray(seg.dataobj))) == {0, 4}  # scheme guessed from "_t1ce"


@pytest.mark.slow
def test_evaluate_writes_per_case_and_mean_scores(phantom_dir, tmp_path):
    run = _make_run(tmp_path)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--data",
                str(phantom_dir),
                "--split",
                "test",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["split"] == "test" and len(result["cases"]) == 1
    (case,) = result["cases"]
    scores = result["per_case"][case]
    assert set(scores) >= {"NCR", "ED", "ET", "WT", "TC", "mean"}
    # one case: the means are its NCR, ED and ET scores' mean (the paper's Mean Dice)
    for key in ("dice", "iou"):
        assert result[f"mean_{key}"] == pytest.approx(
            np.mean([scores[c][key] for c in ("NCR", "ED", "ET")]))
    assert result["checkpoint"] == "best.pt"
    from fuse4seg.utils import code_digest, file_sha256

    assert result["checkpoint_sha256"] == file_sha256(run / "checkpoints" / "best.pt")
    assert result["code"] == code_digest()
    # a follower that says "background" everywhere scores 0 on a case with every region
    from fuse4seg.inference import evaluate_run

    silent = evaluate_run(_make_run(tmp_path / "bg", favour=0), phantom_dir, device="cpu")
    assert silent["cases"] == [case] and silent["mean_dice"] == 0.0
    assert all(silent["per_case"][case][c]["dice"] == 0.0 for c in ("NCR", "ED", "ET"))


def test_an_unwritable_json_is_refused_before_any_scoring(phantom_dir, tmp_path, capsys,
                                                          monkeypatch):
    """evaluate --json under a file (not a folder): refused by name before the model loads."""
    from fuse4seg import inference

    run = _make_run(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(inference, "load_bundle", None)  # must not be reached
    assert main(["evaluate", str(run), "--data", str(phantom_dir), "--json",
                 str(blocker / "eval.json")]) == 2
    assert f"--json {blocker / 'eval.json'}: {blocker} is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_scoring_keeps_the_test_volumes_and_scores_as_a_fresh_read(phantom_dir, tmp_path,
                                                                    monkeypatch):
    from fuse4seg import inference
    from fuse4seg.data import layouts

    run = _make_run(tmp_path)
    monkeypatch.setattr(inference, "_SCORED", {})  # nothing kept from other tests
    reads = []
    real = layouts.load_case
    monkeypatch.setattr(layouts, "load_case", lambda *a, **k: reads.append(1) or real(*a, **k))
    first = inference.evaluate_run(run, phantom_dir, split="all", device="cpu")
    assert len(reads) == len(first["cases"]) == 3
    again = inference.evaluate_run(run, phantom_dir, split="all", device="cpu")
    assert len(reads) == 3 and again["per_case"] == first["per_case"]  # read once, same scores
    # the kept arrays cannot be changed by a caller
    (slices, brain, seg) = next(iter(inference._SCORED.values()))
    with pytest.raises(ValueError, match="read-only"):
        seg[0, 0, 0] = 1
    # as scored from a fresh read, with x_f put back or not
    monkeypatch.setattr(inference, "_SCORED", {})
    monkeypatch.setattr(inference, "SCORED_CACHE_BYTES", 0)  # nothing fits: read every time
    fresh = inference.evaluate_run(run, phantom_dir, split="all", device="cpu")
    assert len(reads) == 6 and fresh["per_case"] == first["per_case"] and not inference._SCORED
    case = real(phantom_dir / first["cases"][0])
    bundle = inference.load_bundle(run, device="cpu")
    x_f, seg_a = inference.predict_volume(bundle, case.t1ce, case.flair, case.brain_mask)
    none, seg_b = inference.predict_volume(bundle, case.t1ce, case.flair, case.brain_mask,
                                           fused=False)
    assert x_f is not None and x_f.shape == case.shape and none is None
    np.testing.assert_array_equal(seg_a, seg_b)


@pytest.mark.slow
def test_scoring_a_case_whose_file_is_gone_names_the_file(phantom_dir, tmp_path, monkeypatch):
    import shutil

    from fuse4seg import inference
    from fuse4seg.data.layouts import DataError

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    run = _make_run(tmp_path)
    monkeypatch.setattr(inference, "_SCORED", {})
    inference.evaluate_run(run, data, split="all", device="cpu")
    gone = next(data.glob("*/*_t1ce.nii.gz"))
    gone.unlink()
    with pytest.raises(DataError, match=f"{gone.parent.name}: missing T1ce"):
        inference.evaluate_run(run, data, split="all", device="cpu")


def test_predict_refuses_a_folder_in_an_output_files_place_before_writing(phantom_dir, tmp_path,
                                                                           capsys, monkeypatch):
    """A ``seg.nii.gz`` that is a folder is refused before the model runs (minutes at the
    paper's size), so ``fused.nii.gz`` is never written beside an old segmentation."""
    from fuse4seg import inference

    run = _make_run(tmp_path / "run")
    t1ce, flair = _case_files(sorted(phantom_dir.iterdir())[0])
    out = tmp_path / "out"
    (out / "seg.nii.gz").mkdir(parents=True)

    def never(*args, **kwargs):
        raise AssertionError("the model ran before the outputs were checked")

    monkeypatch.setattr(inference, "predict_volume", never)
    assert _predict(run, t1ce, flair, out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: seg.nii.gz is a folder" in err
    assert not (out / "fused.nii.gz").exists()


def test_predict_never_overwrites_its_inputs_and_refuses_a_sagittal_volume(phantom_dir,
                                                                           tmp_path, capsys):
    """An output named like an input (fused.nii.gz, seg.nii.gz in --out) is refused before
    anything is read, and so is a volume whose third axis is not the axial one: predict would
    otherwise cut it into sagittal slices and label them without any error."""
    import shutil

    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(t1ce, same / "fused.nii.gz")
    shutil.copy(flair, same / "seg.nii.gz")
    before = {p.name: p.read_bytes() for p in same.iterdir()}
    assert _predict(run, same / "fused.nii.gz", same / "seg.nii.gz", same) == 2
    err = capsys.readouterr().err
    assert f"--out {same / 'fused.nii.gz'}: is the input --t1ce" in err
    assert {p.name: p.read_bytes() for p in same.iterdir()} == before
    # the same volumes stored sagittally: axes (S, x, y) with the affine that says so
    image = nib.load(str(flair))
    data = np.asarray(image.dataobj, dtype=np.float32)
    sagittal = tmp_path / "sagittal.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 0, 1)), image.affine[:, [2, 0, 1, 3]]),
             str(sagittal))
    assert nib.aff2axcodes(nib.load(str(sagittal)).affine)[2] != "S"
    assert _predict(run, t1ce, sagittal, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "sagittal.nii.gz: the FLAIR's third voxel axis runs" in err
    assert "not superior-inferior" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_warns_when_the_runs_crop_cuts_the_brain_away(phantom_dir, tmp_path):
    """A volume at twice the training resolution: the run's 64-pixel crop after 4x
    down-sampling holds only its centre, and predict says so (as `data prepare` does)."""
    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    big = []
    for path in (t1ce, flair):
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32).repeat(2, 0).repeat(2, 1)
        affine = image.affine.copy()
        affine[:3, :2] /= 2
        big.append(tmp_path / f"big_{path.name}")
        nib.save(nib.Nifti1Image(data, affine), str(big[-1]))
    with pytest.warns(UserWarning, match=r"data.crop_size=64 after 4x down-sampling cuts "
                                         r"\d+\.\d% of the brain away"):
        assert _predict(run, *big, tmp_path / "out") == 0
    assert (tmp_path / "out" / "seg.nii.gz").is_file()


@pytest.mark.slow
def test_evaluate_warns_when_the_split_is_not_held_out_from_the_run(phantom_dir, tmp_path,
                                                                    monkeypatch):
    """`evaluate` on a split the run trained on (by its own cache's split) names the cases,
    also through a relative checkpoint path; with the run's own data it says nothing; with the
    run's cache gone or prepared again, and a manifest not the run's, it says it cannot check."""
    import warnings

    from fuse4seg.data.slices import load_manifest
    from fuse4seg.inference import evaluate_run
    from fuse4seg.train.runs import data_checksum

    run = _make_run(tmp_path / "runs")
    first = evaluate_run(run, phantom_dir, device="cpu")  # prepares the cache beside the run
    (cache,) = (tmp_path / "runs").glob("cache-*")
    (case,) = first["cases"]

    def warned(info: dict, target: Path | str = run) -> list[str]:
        (run / "run.json").write_text(json.dumps(info))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate_run(target, phantom_dir, device="cpu")
        return [str(w.message) for w in caught if "held out" in str(w.message)]

    # the data the run was trained on: silent, wherever the run's cache is
    assert warned({"cache": str(cache), "data_checksum": data_checksum(cache)}) == []
    assert warned({"cache": str(tmp_path / "gone"), "data_checksum": data_checksum(cache)}) == []
    # other data, the run's own cache intact: its split names the case the run trained on
    own = load_manifest(cache)
    own["split"] = {"train": [case], "val": [], "test": []}
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "manifest.json").write_text(json.dumps(own))
    info = {"cache": str(tmp_path / "own"), "data_checksum": data_checksum(tmp_path / "own")}
    (message,) = warned(info)
    assert f"1 of its 1 test cases are cases run {run.name} trained or validated on ({case})" \
        in message and "--split all" in message
    monkeypatch.chdir(run / "checkpoints")  # a relative checkpoint path finds its run too
    (message,) = warned(info, "best.pt")
    assert f"cases run {run.name} trained or validated on ({case})" in message
    monkeypatch.chdir(tmp_path)
    # the run's cache gone, or prepared again since (its manifest no longer the recorded one)
    for gone in (tmp_path / "gone", cache):
        (message,) = warned({"cache": str(gone), "data_checksum": "other"})
        assert "cannot tell whether its 1 test cases are held out" in message
    # ... unless run.json records the split: it names the case, and only one the run saw
    recorded = {"cache": str(tmp_path / "gone"), "data_checksum": "other",
                "split": {"train": [], "val": [case], "test": []}}
    (message,) = warned(recorded)
    assert f"trained or validated on ({case}), by the split the run recorded" in message
    recorded["split"] = {"train": [], "val": [], "test": [case]}
    assert warned(recorded) == []
    assert not list((run / "checkpoints").glob("cache-*"))  # a checkpoint's cache: beside RUN

    def warned_all(info: dict) -> list[str]:
        (run / "run.json").write_text(json.dumps(info))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate_run(run, phantom_dir, split="all", device="cpu")
        return [str(w.message) for w in caught if "held out" in str(w.message)]

    # --split all on the run's own data: every case but its test cases was seen
    ours = warned_all({"cache": str(cache), "data_checksum": data_checksum(cache)})
    split = load_manifest(cache)["split"]
    seen = len(split["train"]) + len(split["val"])
    assert len(ours) == 1 and f"{seen} of its {seen + len(split['test'])} cases are cases " \
        "run" in ours[0] and "--split test" in ours[0]
    # other data: named by the recorded split; silent where no split can be found
    recorded["split"] = {"train": [case], "val": [], "test": []}
    (message,) = warned_all(recorded)
    assert f"trained or validated on ({case}), by the split the run recorded" in message
    assert warned_all({"cache": str(tmp_path / "gone"), "data_checksum": "other"}) == []


def test_replacing_a_pair_of_files_is_all_or_nothing(tmp_path, monkeypatch):
    """``utils.atomic_replace_files``, which ``predict`` writes its two volumes with: a target
    that cannot be replaced (an immutable file) or a stop between the two renames leaves both
    earlier files as they were and no temporary file; no target is ever missing on the way;
    ``None`` removes a file."""
    import os

    from fuse4seg import utils

    a, b = tmp_path / "fused.nii.gz", tmp_path / "seg.nii.gz"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real = os.replace
    seen = []

    def refuse_b(src, dst):
        seen.append(a.exists() and b.exists())
        if Path(dst) == b:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst)

    monkeypatch.setattr(utils.os, "replace", refuse_b)
    with pytest.raises(OSError) as info:
        utils.atomic_replace_files({a: b"new a", b: b"new b"})
    monkeypatch.setattr(utils.os, "replace", real)
    assert info.value.filename == str(b) and info.value.strerror == "Operation not permitted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.nii.gz", "seg.nii.gz"]
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert seen and all(seen)

    def stop_at_second_new_file(src, dst):
        seen.append(a.exists() and b.exists())
        if Path(dst) == b and str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(utils.os, "replace", stop_at_second_new_file)
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_replace_files({a: b"new a", b: b"new b"})
    monkeypatch.setattr(utils.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.nii.gz", "seg.nii.gz"]
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert all(seen)
    utils.atomic_replace_files({a: None, b: b"new b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    assert b.read_bytes() == b"new b"


def test_a_checkpoint_without_a_label_scheme_asks_for_one(phantom_dir, tmp_path, capsys):
    """An earlier fuse4seg stored the first case's layout as the scheme (``named`` for data
    with other file names); where the input's names do not say either, ``predict`` asks for
    --scheme, naming the checkpoint, instead of blaming a --scheme nobody gave."""
    from fuse4seg.train.checkpoint import load_checkpoint

    run = _make_run(tmp_path)
    best = run / "checkpoints" / "best.pt"
    save_checkpoint(best, {**load_checkpoint(best), "scheme": "named"})
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    plain = tmp_path / "in"
    plain.mkdir()
    (plain / "post.nii.gz").write_bytes(t1ce.read_bytes())  # no _t1ce / -t1c in the name
    (plain / "fl.nii.gz").write_bytes(flair.read_bytes())
    out = tmp_path / "out"
    assert _predict(run, plain / "post.nii.gz", plain / "fl.nii.gz", out) == 2
    err = capsys.readouterr().err
    assert f"{best}: the checkpoint gives 'named' as its training data's label scheme" in err
    assert "give --scheme (one of brats2013, brats2021, brats2023, msd)" in err
    assert not out.exists()
    assert _predict(run, plain / "post.nii.gz", plain / "fl.nii.gz", out,
                    "--scheme", "brats2023") == 0
    assert "(brats2023 scheme)" in capsys.readouterr().out
    # a run whose training cases' scheme is not known (named cases of an earlier cache)
    save_checkpoint(best, {**load_checkpoint(best), "scheme": None})
    assert _predict(run, plain / "post.nii.gz", plain / "fl.nii.gz", out) == 2
    assert "the checkpoint does not say its training data's label scheme, and the file " in (
        capsys.readouterr().err)


def test_a_checkpoint_of_other_networks_is_refused_with_its_path(tmp_path, capsys):
    from fuse4seg.train.checkpoint import load_checkpoint

    run = _make_run(tmp_path)
    best = run / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    follower = dict(state["follower"])
    follower.pop(next(iter(follower)))
    save_checkpoint(best, {**state, "follower": follower})
    with pytest.raises(ValueError, match=rf"{re.escape(str(best))}: a checkpoint this fuse4seg "
                                         r"cannot load \(Error\(s\) in loading state_dict"):
        load_bundle(run, device="cpu")
    save_checkpoint(best, {**state, "method": "nosuch"})
    with pytest.raises(ValueError, match=r"cannot load \(method 'nosuch': unknown"):
        load_bundle(run, device="cpu")


def test_sigterm_stops_predict_like_ctrl_c(phantom_dir, tmp_path):
    """A scheduler's SIGTERM while the model runs: exit 143, one line, and the folders the call
    made are gone (Python's default would end the process and leave them)."""
    import subprocess
    import sys

    run = _make_run(tmp_path)
    t1ce, flair = _case_files(sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0])
    out = tmp_path / "made" / "out"
    script = (
        "import os, signal, sys\n"
        "import fuse4seg.inference as inference\n"
        "from fuse4seg.cli import main\n"
        "def killed(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    raise AssertionError('SIGTERM did not stop the command')\n"
        "inference.predict_volume = killed\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "predict", "--checkpoint", str(run), "--t1ce", str(t1ce),
         "--flair", str(flair), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "fuse4seg: terminated (SIGTERM)"
    assert not (tmp_path / "made").exists()


def test_the_command_line_puts_the_sigterm_handler_back(tmp_path, capsys):
    """``main`` turns SIGTERM into an exception only while its command runs, and only in the
    main thread (``signal.signal`` works nowhere else)."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "check", str(tmp_path)]) == 2  # no cases: an expected error
    assert signal.getsignal(signal.SIGTERM) is before
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["data", "check",
                                                                str(tmp_path)])))
    thread.start()
    thread.join()
    assert codes == [2] and signal.getsignal(signal.SIGTERM) is before
    assert "no BraTS cases found" in capsys.readouterr().err
