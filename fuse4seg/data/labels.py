"""Every label scheme, the canonical one, and the BraTS evaluation regions, in one module.

Canonical labels inside the package (what the follower predicts):

====  ==========  =========================================================
 id   name        meaning
====  ==========  =========================================================
 0    background  everything else
 1    NCR         necrotic (and, in BRATS 2013/2015, non-enhancing) tumour core
 2    ED          peritumoral edema (BraTS 2023+: SNFH)
 3    ET          enhancing tumour
====  ==========  =========================================================

Input schemes: ``brats2021`` (0, 1, 2, 4; ET = 4, BraTS 2018-2021), ``brats2023`` (0, 1, 2, 3;
ET = 3, NETC ≈ NCR, SNFH ≈ ED) and ``brats2013`` (0 bg, 1 necrosis, 2 edema, 3 non-enhancing,
4 enhancing; 3 is merged into NCR as BraTS 2021 did) and ``msd`` (Medical Segmentation Decathlon
Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing). Regions: WT = NCR ∪ ED ∪ ET,
TC = NCR ∪ ET, ET. Explained in chapter 1.
"""

from __future__ import annotations

import numpy as np

CANONICAL_NAMES = ("background", "NCR", "ED", "ET")
"""Canonical class names, indexed by canonical label."""
TUMOUR_CLASSES = ("NCR", "ED", "ET")
NUM_CLASSES = 4

SCHEMES: dict[str, dict[int, int]] = {
    # input value -> canonical value
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "brats2013": {0: 0, 1: 1, 2: 2, 3: 1, 4: 3},
    # Medical Segmentation Decathlon Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}
"""Map from each input scheme's label values to canonical labels."""

EXPORT: dict[str, dict[int, int]] = {
    # canonical value -> value in the scheme (the inverse used by ``predict``)
    "brats2021": {0: 0, 1: 1, 2: 2, 3: 4},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "brats2013": {0: 0, 1: 1, 2: 2, 3: 4},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}

REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (1, 2, 3),
    "TC": (1, 3),
    "ET": (3,),
}
"""BraTS evaluation regions as sets of canonical labels."""


class LabelError(ValueError):
    """A label map holds values outside its scheme."""


def to_canonical(seg: np.ndarray, scheme: str, where: str = "segmentation") -> np.ndarray:
    """Map a label volume of ``scheme`` to canonical labels (uint8).

    Raises:
        LabelError: naming ``where`` and the unexpected values.
    """
    if scheme not in SCHEMES:
        raise LabelError(f"unknown label scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    mapping = SCHEMES[scheme]
    seg_int = np.asarray(seg)
    if not np.issubdtype(seg_int.dtype, np.integer):
        rounded = np.rint(seg_int)
        if not np.allclose(rounded, seg_int):
            raise LabelError(f"{where}: label map has non-integer values")
        seg_int = rounded.astype(np.int64)
    values = np.unique(seg_int)
    bad = [int(v) for v in values if int(v) not in mapping]
    if bad:
        raise LabelError(
            f"{where}: label values {bad} are outside the {scheme} scheme {sorted(mapping)}"
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[seg_int.astype(np.int64)]


def from_canonical(seg: np.ndarray, scheme: str) -> np.ndarray:
    """Map canonical labels back to ``scheme`` (e.g. ET 3 → 4 for BraTS 2021)."""
    if scheme not in EXPORT:
        raise LabelError(f"unknown label scheme {scheme!r}; choose one of {sorted(EXPORT)}")
    seg = np.asarray(seg)
    if seg.size and (seg.min() < 0 or seg.max() >= NUM_CLASSES):
        raise LabelError(f"canonical labels must be in 0..{NUM_CLASSES - 1}")
    lut = np.array([EXPORT[scheme][c] for c in range(NUM_CLASSES)], dtype=np.uint8)
    return lut[seg.astype(np.int64)]


def label_counts(seg: np.ndarray) -> dict[str, int]:
    """Voxel counts per canonical label, by name."""
    counts = np.bincount(np.asarray(seg, dtype=np.int64).ravel(), minlength=NUM_CLASSES)
    return {name: int(counts[i]) for i, name in enumerate(CANONICAL_NAMES)}


def region_mask(seg: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (``"WT"``, ``"TC"``, ``"ET"``) or a canonical class name."""
    if region in REGIONS:
        return np.isin(seg, REGIONS[region])
    if region in CANONICAL_NAMES:
        return np.asarray(seg) == CANONICAL_NAMES.index(region)
    raise KeyError(f"unknown region {region!r}; use {list(REGIONS) + list(CANONICAL_NAMES)}")
