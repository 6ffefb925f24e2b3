"""Find BraTS cases on disk in any of the common layouts and read them in one canonical form.

Layouts (detected per case folder, or named with ``layout=`` / ``--layout``):

==========  ============================================  ==========================  ======
layout      files in ``<case>/``                          labels                      scheme
==========  ============================================  ==========================  ======
brats2021   ``<ID>_t1ce.nii.gz``, ``_flair``, ``_seg``    0, 1 NCR, 2 ED, 4 ET        2018-21
brats2023   ``<ID>-t1c.nii.gz``, ``-t2f``, ``-seg``       0, 1 NETC, 2 SNFH, 3 ET     BraTS 2023+
brats2013   ``T1c*.nii.gz``, ``Flair*``, ``OTMultiClass``  0, 1, 2, 3 non-enh., 4 ET   BRATS 2013/15
            ``brainmask.nii.gz`` (optional)
msd         ``imagesTr/<ID>.nii.gz`` (4-D: FLAIR, T1w,    0, 1 edema, 2 non-enh.,     MSD Task01
            T1gd, T2w), ``labelsTr/<ID>.nii.gz``          3 enhancing
==========  ============================================  ==========================  ======

Every case is returned as a :class:`Case` whose ``seg`` holds canonical labels (0 background,
1 NCR, 2 ED, 3 ET; see :mod:`fuse4seg.data.labels`). Every problem a user meets in practice — a
missing modality, a shape or affine mismatch, NaN/inf, an all-zero volume, label values outside
the scheme, an unreadable or truncated file — raises :class:`DataError` naming the case and the
file. ``fuse4seg data check DIR`` runs all of these checks over a folder.

Intensities (:func:`normalize_intensity`): each volume is scaled per volume, inside the brain,
by robust percentiles (0.5 and 99.5 by default) to [0, 1] and set to 0 outside the brain. Both
sources must share one range because the leader's output lives in [0, 1] and its reconstruction
anchor is (x1 + x2)/2 (Eq. 3); percentiles rather than min/max keep a few hot voxels (vessels,
artefacts) from compressing the tissue contrast. The brain is the non-zero voxels of either
modality, or the brain mask where the layout provides one (BRATS 2013/2015 volumes are already
z-scored with a constant negative background, so "non-zero" would be wrong there).

Explained in chapter 1 (``book/01_data.md``).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.data.labels import LabelError, label_counts, to_canonical

__all__ = [
    "LAYOUTS",
    "Case",
    "CaseFiles",
    "DataError",
    "check_case",
    "check_dataset",
    "detect_layout",
    "find_cases",
    "load_case",
    "load_volume",
    "normalize_intensity",
]

LAYOUTS = ("brats2021", "brats2023", "brats2013", "msd")
SCHEME_OF_LAYOUT = {layout: layout for layout in LAYOUTS}
NIFTI = (".nii.gz", ".nii")
MSD_CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}


class DataError(ValueError):
    """A data problem; the message names the case and the file."""


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are. ``paths`` maps ``t1ce``, ``flair``, ``seg``, ``mask`` to a
    path or ``None`` (missing); for ``msd`` the ``t1ce`` and ``flair`` paths are the same 4-D
    image."""

    case_id: str
    layout: str
    paths: dict[str, Path | None] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return SCHEME_OF_LAYOUT[self.layout]


@dataclass
class Case:
    """One case in canonical form (see the module docstring)."""

    case_id: str
    layout: str
    scheme: str
    t1ce: np.ndarray  # float32 (X, Y, Z), raw intensities
    flair: np.ndarray  # float32 (X, Y, Z), raw intensities
    seg: np.ndarray | None  # uint8 (X, Y, Z), canonical labels 0..3
    brain_mask: np.ndarray  # bool (X, Y, Z)
    affine: np.ndarray  # (4, 4)
    header: Any  # nibabel header of the T1ce file
    files: CaseFiles | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.t1ce.shape)

    def normalized(self, percentiles: tuple[float, float] = (0.5, 99.5)):
        """``(t1ce, flair)`` scaled to [0, 1] inside the brain (:func:`normalize_intensity`)."""
        return (
            normalize_intensity(self.t1ce, self.brain_mask, percentiles),
            normalize_intensity(self.flair, self.brain_mask, percentiles),
        )


# ---------------------------------------------------------------------------------------------
# Finding cases


def _first(folder: Path, patterns: list[str]) -> Path | None:
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
        if hits:
            return hits[0]
    return None


def _nifti_patterns(stem_patterns: list[str]) -> list[str]:
    return [s + ext for s in stem_patterns for ext in NIFTI]


_SIGNATURES = {
    # layout -> patterns whose presence marks a case folder of that layout
    "brats2021": ["*_t1ce", "*_flair", "*_seg"],
    "brats2023": ["*-t1c", "*-t2f", "*-seg"],
    "brats2013": ["T1c*", "Flair*", "OTMultiClass*"],
}


def detect_layout(folder: str | Path) -> str | None:
    """The layout of a case folder (or of a dataset folder, for ``msd``), or ``None``."""
    folder = Path(folder)
    if (folder / "imagesTr").is_dir():
        return "msd"
    for layout, stems in _SIGNATURES.items():
        if _first(folder, _nifti_patterns(stems)) is not None:
            return layout
    return None


def _case_files(folder: Path, layout: str) -> CaseFiles:
    if layout == "brats2021":
        find = {
            "t1ce": ["*_t1ce"],
            "flair": ["*_flair"],
            "seg": ["*_seg"],
        }
    elif layout == "brats2023":
        find = {"t1ce": ["*-t1c"], "flair": ["*-t2f"], "seg": ["*-seg"]}
    elif layout == "brats2013":
        find = {
            "t1ce": ["T1c*"],
            "flair": ["Flair*"],
            "seg": ["OTMultiClass*", "OT*"],
            "mask": ["brainmask*"],
        }
    else:
        raise DataError(f"{folder}: unknown layout {layout!r}; choose one of {LAYOUTS}")
    paths = {key: _first(folder, _nifti_patterns(stems)) for key, stems in find.items()}
    return CaseFiles(case_id=folder.name, layout=layout, paths=paths)


def _msd_cases(root: Path) -> list[CaseFiles]:
    images = sorted(
        p for p in (root / "imagesTr").iterdir() if p.name.endswith(NIFTI) and p.name[0] != "."
    )
    cases = []
    for image in images:
        case_id = re.sub(r"\.nii(\.gz)?$", "", image.name)
        label = root / "labelsTr" / image.name
        paths = {"t1ce": image, "flair": image, "seg": label if label.exists() else None}
        cases.append(CaseFiles(case_id=case_id, layout="msd", paths=paths))
    return cases


def find_cases(root: str | Path, layout: str | None = None) -> list[CaseFiles]:
    """All cases under ``root``, sorted by id.

    ``root`` may be a dataset folder (one sub-folder per case), a single case folder, or an MSD
    Task01 folder (with ``imagesTr/``). ``layout=None`` detects the layout of each case.

    Raises:
        DataError: ``root`` is missing or holds no recognisable case; ``layout`` is unknown.
    """
    root = Path(root)
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (give the folder that holds the cases)")
    if layout == "msd" or (layout is None and (root / "imagesTr").is_dir()):
        if not (root / "imagesTr").is_dir():
            raise DataError(f"{root}: layout 'msd' needs an imagesTr/ folder")
        cases = _msd_cases(root)
    else:
        own = detect_layout(root)
        folders = [root] if own is not None else sorted(p for p in root.iterdir() if p.is_dir())
        cases = []
        for folder in folders:
            found = detect_layout(folder)
            if found is None or found == "msd":
                continue
            if layout is not None and found != layout:
                raise DataError(
                    f"case {folder.name}: files look like layout {found!r}, not {layout!r} "
                    f"({folder})"
                )
            cases.append(_case_files(folder, found))
    if not cases:
        raise DataError(
            f"{root}: no BraTS cases found. Expected sub-folders with <ID>_t1ce/_flair/_seg "
            f"(BraTS 2018-2021), <ID>-t1c/-t2f/-seg (BraTS 2023+), T1c*/Flair*/OTMultiClass* "
            f"(BRATS 2013/2015) NIfTI files, or an MSD Task01 folder with imagesTr/"
        )
    return sorted(cases, key=lambda c: c.case_id)


# ---------------------------------------------------------------------------------------------
# Reading


def load_volume(path: str | Path, what: str = "volume"):
    """Read a NIfTI file as float32 with its affine and header.

    Raises:
        DataError: missing, unreadable or truncated file; NaN or inf values.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} file does not exist")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({exc})") from exc
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: {bad} voxels are NaN or inf")
    return data, np.asarray(image.affine, dtype=np.float64), image.header


def _require(files: CaseFiles, key: str, what: str) -> Path:
    path = files.paths.get(key)
    if path is None:
        raise DataError(f"case {files.case_id}: missing {what} file ({files.layout} layout)")
    return path


def load_case(
    folder: str | Path | CaseFiles, layout: str | None = None, require_seg: bool = True
) -> Case:
    """Read one case: T1ce, FLAIR, canonical segmentation, brain mask, affine.

    Args:
        folder: a case folder, or a :class:`CaseFiles` from :func:`find_cases`.
        layout: force a layout (default: detect).
        require_seg: raise when the segmentation is missing (``False`` for inference).

    Returns:
        A :class:`Case`; ``seg`` is ``None`` only when it is absent and not required.

    Raises:
        DataError: any of the problems listed in the module docstring, naming case and file.

    Explained in chapter 1.
    """
    if isinstance(folder, CaseFiles):
        files = folder
    else:
        found = find_cases(folder, layout)
        if len(found) != 1:
            raise DataError(f"{folder}: expected one case, found {len(found)}")
        files = found[0]
    cid = files.case_id
    t1ce_path = _require(files, "t1ce", "T1ce")
    flair_path = _require(files, "flair", "FLAIR")
    if files.layout == "msd":
        data, affine, header = load_volume(t1ce_path, "image")
        if data.ndim != 4 or data.shape[3] < 3:
            raise DataError(f"{t1ce_path}: expected a 4-D image (FLAIR, T1w, T1gd, T2w)")
        t1ce, flair = data[..., MSD_CHANNELS["t1ce"]], data[..., MSD_CHANNELS["flair"]]
        t1ce_affine = flair_affine = affine
    else:
        t1ce, t1ce_affine, header = load_volume(t1ce_path, "T1ce")
        flair, flair_affine, _ = load_volume(flair_path, "FLAIR")
    for arr, path in ((t1ce, t1ce_path), (flair, flair_path)):
        if arr.ndim != 3:
            raise DataError(f"case {cid}: {path} has {arr.ndim} dimensions, expected 3")
    _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, flair, flair_affine, flair_path)

    mask_path = files.paths.get("mask")
    if mask_path is not None:
        mask_data, mask_affine, _ = load_volume(mask_path, "brain mask")
        _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, mask_data, mask_affine, mask_path)
        brain = mask_data > 0.5
    else:
        brain = (t1ce != 0) | (flair != 0)
    for arr, path, name in ((t1ce, t1ce_path, "T1ce"), (flair, flair_path, "FLAIR")):
        inside = arr[brain] if brain.any() else arr
        if inside.size == 0 or float(inside.max()) == float(inside.min()):
            raise DataError(f"case {cid}: {name} volume {path} is all zero (or constant)")
    if not brain.any():
        raise DataError(f"case {cid}: the brain mask is empty ({mask_path or t1ce_path})")

    seg = None
    seg_path = files.paths.get("seg")
    if seg_path is None:
        if require_seg:
            raise DataError(f"case {cid}: missing segmentation file ({files.layout} layout)")
    else:
        seg_raw, seg_affine, _ = load_volume(seg_path, "segmentation")
        _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, seg_raw, seg_affine, seg_path)
        try:
            seg = to_canonical(seg_raw, files.scheme, where=f"case {cid}: {seg_path}")
        except LabelError as exc:
            raise DataError(str(exc)) from exc
    return Case(
        case_id=cid,
        layout=files.layout,
        scheme=files.scheme,
        t1ce=t1ce,
        flair=flair,
        seg=seg,
        brain_mask=brain,
        affine=t1ce_affine,
        header=header,
        files=files,
    )


def _check_same_grid(cid, ref, ref_affine, ref_path, other, other_affine, other_path) -> None:
    if ref.shape != other.shape:
        raise DataError(
            f"case {cid}: shape mismatch: {ref_path.name} is {ref.shape}, "
            f"{other_path.name} is {other.shape}"
        )
    if not np.allclose(ref_affine, other_affine, atol=1e-3):
        raise DataError(
            f"case {cid}: affine mismatch between {ref_path.name} and {other_path.name}"
        )


def normalize_intensity(
    volume: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Scale ``volume`` to [0, 1] by robust percentiles inside ``mask``; 0 outside the mask.

    Args:
        volume: float array, any shape.
        mask: bool array of the same shape (the brain).
        percentiles: (low, high) percentiles of the in-mask intensities mapped to 0 and 1.

    Returns:
        float32 array in [0, 1].

    Raises:
        DataError: empty mask, or no intensity spread inside it.

    Explained in chapter 1.
    """
    volume = np.asarray(volume, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise DataError(f"mask shape {mask.shape} differs from volume shape {volume.shape}")
    inside = volume[mask]
    if inside.size == 0:
        raise DataError("cannot normalise: the brain mask is empty")
    lo, hi = np.percentile(inside, percentiles)
    if hi <= lo:
        raise DataError("cannot normalise: no intensity spread inside the brain")
    out = np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Checking a dataset


def check_case(files: CaseFiles) -> dict[str, Any]:
    """Load one case and summarise it: ``{"case_id", "layout", "shape", "label_counts",
    "errors"}`` (errors empty when the case is good)."""
    summary: dict[str, Any] = {
        "case_id": files.case_id,
        "layout": files.layout,
        "shape": None,
        "label_counts": None,
        "errors": [],
    }
    try:
        case = load_case(files)
    except DataError as exc:
        summary["errors"].append(str(exc))
        return summary
    summary["shape"] = list(case.shape)
    summary["label_counts"] = label_counts(case.seg)
    return summary


def check_dataset(root: str | Path, layout: str | None = None, progress: bool = False):
    """Run :func:`check_case` over every case under ``root``; a list of summaries."""
    cases = find_cases(root, layout)
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc="checking cases", unit="case")
    return [check_case(files) for files in cases]
