"""Segmentation metrics: Dice and IoU per tumour class (the paper's Table 1) and BraTS region.

Explained in chapter 3 (``book/03_segmentation_follower.md``).

Scores are reported for the canonical classes NCR (1), ED (2), ET (3), their mean ("mean", the
paper's "Mean Dice"/"Mean IoU" over NCR, ED, ET), and the BraTS regions WT = {1, 2, 3} and
TC = {1, 3}; the region ET equals the class ET and shares its key.

Conventions:

- ``Dice = 2 TP / (2 TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``, from voxel counts.
- **Empty truth and empty prediction** of a class in a case: Dice = IoU = 1 (nothing to find,
  nothing found; the BraTS challenge's convention). Empty truth with a non-empty prediction:
  0. Non-empty truth with an empty prediction: 0. (MONAI's ``DiceMetric(ignore_empty=False)``
  and ``MeanIoU(ignore_empty=False)`` agree; ``tests/test_seg_metrics.py`` checks it.)
- **Per case (3-D)**: :class:`SegmentationMeter` sums the voxel counts of every slice of one
  case before forming the ratios, so a case scored slice by slice equals the same case scored
  as one volume. :func:`dice_iou` scores one case (any shape) directly.
- **Per slice**: :func:`dice_iou_per_slice` scores each 2-D slice on its own (with the same
  empty/empty = 1 rule, which makes slice means optimistic). The paper does not say how its
  Dice is aggregated; the book's tables are per case, the usual BraTS reporting.
- **Aggregation over cases**: the arithmetic mean over cases of each per-case score
  (``SegmentationMeter.compute()["mean"]``), the usual BraTS reporting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fuse4seg.data.labels import NUM_CLASSES, REGIONS, TUMOUR_CLASSES

__all__ = [
    "LABEL_SETS",
    "SegmentationMeter",
    "confusion_matrix",
    "dice_iou",
    "dice_iou_per_slice",
    "scores_from_confusion",
    "tumour_mean",
]

LABEL_SETS: dict[str, tuple[int, ...]] = {
    "NCR": (1,),
    "ED": (2,),
    "ET": REGIONS["ET"],
    "WT": REGIONS["WT"],
    "TC": REGIONS["TC"],
}
"""Scored label sets: the three tumour classes and the BraTS regions (ET is both)."""
MEAN_OF = TUMOUR_CLASSES
"""The classes averaged into ``"mean"`` (the paper's Mean Dice / Mean IoU)."""


def tumour_mean(scores, key: str = "dice") -> float:
    """The paper's Mean Dice (or IoU, ``key="iou"``): the mean of NCR, ED and ET of ``scores``
    (``{"NCR": {"dice": .., "iou": ..}, ...}``, e.g. ``SegmentationMeter.compute()["mean"]``)."""
    return float(np.mean([scores[c][key] for c in MEAN_OF]))


def _as_long(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.is_floating_point():
        raise ValueError(f"{name}: expected an integer label map, got {x.dtype}")
    return x.long()


def confusion_matrix(pred, target, num_classes: int = NUM_CLASSES, batch: bool = False):
    """Voxel counts ``M[p, t]`` of predicted label p against true label t.

    Args:
        pred, target: integer label maps of one shape (numpy or torch), values in
            ``0..num_classes-1``.
        batch: if True, the first axis indexes slices and one matrix per slice is returned.

    Returns:
        int64 numpy ``(num_classes, num_classes)``, or ``(N, num_classes, num_classes)``.

    Raises:
        ValueError: shapes differ, float maps, or labels out of range.
    """
    p = _as_long(pred, "pred")
    t = _as_long(target, "target").to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    for x, name in ((p, "pred"), (t, "target")):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(
                f"{name}: labels must be in 0..{num_classes - 1}, "
                f"got {int(x.min())}..{int(x.max())}"
            )
    k = num_classes
    if batch:
        n = p.shape[0]
        idx = torch.arange(n, device=p.device).view(-1, *[1] * (p.ndim - 1)) * k * k + p * k + t
        counts = torch.bincount(idx.flatten(), minlength=n * k * k).view(n, k, k)
    else:
        counts = torch.bincount((p * k + t).flatten(), minlength=k * k).view(k, k)
    return counts.cpu().numpy().astype(np.int64)


def _set_counts(m: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN of a label set from confusion matrices ``(..., K, K)``."""
    k = m.shape[-1]
    inside = np.zeros(k, dtype=bool)
    inside[list(labels)] = True
    tp = m[..., inside, :][..., :, inside].sum(axis=(-2, -1))
    fp = m[..., inside, :][..., :, ~inside].sum(axis=(-2, -1))
    fn = m[..., ~inside, :][..., :, inside].sum(axis=(-2, -1))
    return tp, fp, fn


def _ratios(tp, fp, fn) -> tuple[np.ndarray, np.ndarray]:
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    empty = (tp + fp + fn) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn))
        iou = np.where(empty, 1.0, tp / (tp + fp + fn))
    return dice, iou


def scores_from_confusion(m: np.ndarray) -> dict[str, dict[str, float]]:
    """Dice and IoU of every label set (and ``"mean"``) from one ``(K, K)`` confusion matrix."""
    out: dict[str, dict[str, float]] = {}
    for name, labels in LABEL_SETS.items():
        dice, iou = _ratios(*_set_counts(m, labels))
        out[name] = {"dice": float(dice), "iou": float(iou)}
    out["mean"] = {key: float(np.mean([out[c][key] for c in MEAN_OF])) for key in ("dice", "iou")}
    return out


def dice_iou(pred, target, num_classes: int = NUM_CLASSES) -> dict[str, dict[str, float]]:
    """Dice and IoU of one case (a 3-D volume, or a 2-D slice scored on its own).

    Args:
        pred, target: canonical label maps (0 bg, 1 NCR, 2 ED, 3 ET) of one shape, numpy or
            torch integers.
        num_classes: 4.

    Returns:
        ``{"NCR": {"dice", "iou"}, "ED": ..., "ET": ..., "WT": ..., "TC": ..., "mean": ...}``
        (floats; conventions in the module docstring).

    Raises:
        ValueError: shapes differ, float maps, or labels out of range.

    Explained in chapter 3.
    """
    return scores_from_confusion(confusion_matrix(pred, target, num_classes))


def dice_iou_per_slice(
    pred, target, num_classes: int = NUM_CLASSES
) -> dict[str, dict[str, np.ndarray]]:
    """Dice and IoU of each slice of a stack ``(N, H, W)``, scored independently.

    Returns:
        ``{name: {"dice": (N,) float64, "iou": (N,) float64}}`` for every label set and
        ``"mean"``.
    """
    m = confusion_matrix(pred, target, num_classes, batch=True)  # (N, K, K)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, labels in LABEL_SETS.items():
        dice, iou = _ratios(*_set_counts(m, labels))
        out[name] = {"dice": dice, "iou": iou}
    out["mean"] = {key: np.mean([out[c][key] for c in MEAN_OF], axis=0) for key in ("dice", "iou")}
    return out


class SegmentationMeter:
    """Accumulates voxel counts per case over an evaluation loop, then scores each case.

    ``update`` may be called with single slices, batches of slices from several cases, or whole
    volumes; slices of one case add up, so the per-case score is the 3-D score.

    Example::

        meter = SegmentationMeter()
        for batch in loader:
            meter.update(logits.argmax(1), batch["seg"], batch["case_id"])
        result = meter.compute()   # {"per_case": {id: scores}, "mean": scores, "cases": n}

    Explained in chapter 3.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every case."""
        self._counts: dict[str, np.ndarray] = {}

    def update(self, pred, target, case_id: str | Sequence[str]) -> None:
        """Add the counts of ``pred`` against ``target``.

        Args:
            pred, target: label maps of one shape. With ``case_id`` a string they all belong to
                that case (any shape); with a sequence of ids, the first axis indexes items and
                ``len(case_id)`` must equal it.
            case_id: a case id, or one id per item of the batch.

        Raises:
            ValueError: mismatched shapes or ids, labels out of range.
        """
        if isinstance(case_id, str):
            m = confusion_matrix(pred, target, self.num_classes)
            self._add(case_id, m)
            return
        ids = list(case_id)
        m = confusion_matrix(pred, target, self.num_classes, batch=True)  # (N, K, K)
        if len(ids) != m.shape[0]:
            raise ValueError(f"update: {len(ids)} case ids for a batch of {m.shape[0]} items")
        for cid, mi in zip(ids, m, strict=True):
            self._add(str(cid), mi)

    def _add(self, case_id: str, m: np.ndarray) -> None:
        if case_id in self._counts:
            self._counts[case_id] = self._counts[case_id] + m
        else:
            self._counts[case_id] = m.copy()

    @property
    def case_ids(self) -> list[str]:
        """Cases seen so far, sorted."""
        return sorted(self._counts)

    def compute(self) -> dict:
        """Per-case scores and their mean over cases.

        Returns:
            ``{"per_case": {case_id: dice_iou-style dict}, "mean": dice_iou-style dict of``
            ``the means over cases, "cases": number of cases}``; ``"mean"`` holds NaN when
            no case was seen.
        """
        per_case = {cid: scores_from_confusion(self._counts[cid]) for cid in self.case_ids}
        names = [*LABEL_SETS, "mean"]
        if per_case:
            mean = {
                n: {
                    k: float(np.mean([s[n][k] for s in per_case.values()])) for k in ("dice", "iou")
                }
                for n in names
            }
        else:
            mean = {n: {"dice": float("nan"), "iou": float("nan")} for n in names}
        return {"per_case": per_case, "mean": mean, "cases": len(per_case)}
