"""Segmentation metrics: hand values, conventions, and a cross-check against MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuse4seg.metrics.segmentation import (
    SegmentationMeter,
    confusion_matrix,
    dice_iou,
    dice_iou_per_slice,
)


def test_hand_values_4x4():
    target = np.array([[0, 1, 1, 0], [2, 2, 2, 0], [3, 3, 0, 0], [0, 0, 0, 0]])
    pred = np.array([[0, 1, 0, 0], [2, 2, 0, 0], [3, 1, 0, 0], [0, 0, 0, 3]])
    s = dice_iou(pred, target)
    # NCR: truth 2 px, pred 2 px (one at a true ET pixel), TP 1 -> Dice 2/4, IoU 1/3
    assert s["NCR"]["dice"] == pytest.approx(0.5) and s["NCR"]["iou"] == pytest.approx(1 / 3)
    # ED: truth 3, pred 2, TP 2 -> Dice 4/5, IoU 2/3
    assert s["ED"]["dice"] == pytest.approx(0.8) and s["ED"]["iou"] == pytest.approx(2 / 3)
    # ET: truth 2, pred 2 (one right), TP 1 -> Dice 1/2, IoU 1/3
    assert s["ET"]["dice"] == pytest.approx(0.5) and s["ET"]["iou"] == pytest.approx(1 / 3)
    # WT: truth 7 px, pred 6 px, TP 5 -> Dice 10/13, IoU 5/8
    assert s["WT"]["dice"] == pytest.approx(10 / 13) and s["WT"]["iou"] == pytest.approx(5 / 8)
    # TC = {NCR, ET}: truth 4, pred 4, TP 3 -> Dice 6/8, IoU 3/5
    assert s["TC"]["dice"] == pytest.approx(0.75) and s["TC"]["iou"] == pytest.approx(0.6)
    assert s["mean"]["dice"] == pytest.approx((0.5 + 0.8 + 0.5) / 3)
    assert s["mean"]["iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)


def test_empty_conventions():
    zeros = np.zeros((3, 3), dtype=np.int64)
    s = dice_iou(zeros, zeros)  # empty truth, empty prediction -> 1
    assert all(s[k]["dice"] == 1.0 and s[k]["iou"] == 1.0 for k in s)
    one = zeros.copy()
    one[1, 1] = 3
    s = dice_iou(one, zeros)  # empty truth, non-empty prediction -> 0
    assert s["ET"]["dice"] == 0.0 and s["NCR"]["dice"] == 1.0
    s = dice_iou(zeros, one)  # non-empty truth, empty prediction -> 0
    assert s["ET"]["dice"] == 0.0 and s["ET"]["iou"] == 0.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_iou(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        dice_iou(np.full((2, 2), 4), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer label map"):
        dice_iou(np.zeros((2, 2)), np.zeros((2, 2), int))


def test_torch_and_numpy_agree_and_confusion_counts():
    rng = np.random.default_rng(1)
    p, t = rng.integers(0, 4, (5, 6, 7)), rng.integers(0, 4, (5, 6, 7))
    assert dice_iou(p, t) == dice_iou(torch.from_numpy(p), torch.from_numpy(t))
    m = confusion_matrix(p, t)
    assert m.sum() == p.size and m[2, 1] == int(((p == 2) & (t == 1)).sum())


def test_meter_slices_add_up_to_the_volume():
    rng = np.random.default_rng(0)
    vol_p = rng.integers(0, 4, (6, 8, 8))
    vol_t = rng.integers(0, 4, (6, 8, 8))
    vol_t[:, :2] = 0
    meter = SegmentationMeter()
    # slices arrive in mixed batches with another case in between
    meter.update(vol_p[:4], vol_t[:4], ["a"] * 4)
    meter.update(np.zeros((8, 8), int), np.zeros((8, 8), int), "b")
    meter.update(vol_p[4:], vol_t[4:], ["a", "a"])
    out = meter.compute()
    assert out["cases"] == 2 and meter.case_ids == ["a", "b"]
    assert out["per_case"]["a"] == dice_iou(vol_p, vol_t)
    assert out["per_case"]["b"]["WT"]["dice"] == 1.0
    for name in ("NCR", "WT", "mean"):
        for key in ("dice", "iou"):
            expected = (out["per_case"]["a"][name][key] + 1.0) / 2
            assert out["mean"][name][key] == pytest.approx(expected)
    meter.reset()
    assert meter.compute()["cases"] == 0
    with pytest.raises(ValueError, match="2 case ids for a batch of 4"):
        meter.update(vol_p[:4], vol_t[:4], ["a", "b"])


def test_per_slice_matches_one_slice_at_a_time():
    rng = np.random.default_rng(2)
    p, t = rng.integers(0, 4, (4, 5, 5)), rng.integers(0, 4, (4, 5, 5))
    p[1] = 0
    t[1] = 0
    per = dice_iou_per_slice(p, t)
    for i in range(4):
        single = dice_iou(p[i], t[i])
        for name in ("NCR", "ED", "ET", "WT", "TC", "mean"):
            assert per[name]["dice"][i] == pytest.approx(single[name]["dice"])
            assert per[name]["iou"][i] == pytest.approx(single[name]["iou"])


def _region_onehot(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) canonical labels -> (B, 5, H, W) masks of NCR, ED, ET, WT, TC."""
    sets = [(1,), (2,), (3,), (1, 2, 3), (1, 3)]
    return torch.stack([torch.isin(labels, torch.tensor(s)) for s in sets], dim=1).float()


def test_cross_check_against_monai():
    import monai.metrics as metrics
    gen = torch.Generator().manual_seed(0)
    b = 6
    # random label maps, with some classes emptied in some cases to exercise the conventions
    pred = torch.randint(0, 4, (b, 12, 10), generator=gen)
    target = torch.randint(0, 4, (b, 12, 10), generator=gen)
    target[0][target[0] == 1] = 0  # NCR absent from truth
    pred[1][pred[1] == 3] = 0  # ET absent from prediction
    target[2][target[2] == 2] = 0
    pred[2][pred[2] == 2] = 0  # ED absent from both -> 1 by convention
    dice_ref = metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou_ref = metrics.MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    yp, yt = _region_onehot(pred), _region_onehot(target)
    d = dice_ref(yp, yt)  # (B, 5)
    j = iou_ref(yp, yt)
    names = ["NCR", "ED", "ET", "WT", "TC"]
    for i in range(b):
        ours = dice_iou(pred[i], target[i])
        for c, name in enumerate(names):
            assert ours[name]["dice"] == pytest.approx(float(d[i, c]), abs=1e-6), (i, name)
            assert ours[name]["iou"] == pytest.approx(float(j[i, c]), abs=1e-6), (i, name)
    assert dice_iou(pred[2], target[2])["ED"]["dice"] == 1.0
