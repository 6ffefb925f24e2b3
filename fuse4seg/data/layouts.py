"""Find BraTS cases on disk in any of the common layouts and read them in one canonical form.

Layouts (detected per case folder, or given with ``layout=`` / ``--layout``, which reads every
case folder with that layout's file names):

==========  ============================================  ==========================  ======
layout      files in ``<case>/``                          labels                      scheme
==========  ============================================  ==========================  ======
brats2021   ``<ID>_t1ce.nii.gz``, ``_flair``, ``_seg``    0, 1 NCR, 2 ED, 4 ET        2018-21
brats2023   ``<ID>-t1c.nii.gz``, ``-t2f``, ``-seg``       0, 1 NETC, 2 SNFH, 3 ET     BraTS 2023+
brats2013   ``T1c*.nii.gz``, ``Flair*``,                  0, 1, 2, 3 non-enh., 4 ET   BRATS 2013/15
            ``OTMultiClass``; ``brainmask.nii.gz``
            (optional)
msd         ``imagesTr/<ID>.nii.gz`` (4-D: FLAIR, T1w,    0, 1 edema, 2 non-enh.,     MSD Task01
            T1gd, T2w), ``labelsTr/<ID>.nii.gz``          3 enhancing
named       common other names, any case: ``T1c``,        read from the values:       auto
            ``t1ce``, ``t1gd``; ``Flair``, ``t2f``;       4 → BraTS 2021 (3 too →
            ``seg``, ``segmentation``, ``label``,         2013 form), else 2023+
            ``gt``; ``brainmask`` (optional)
==========  ============================================  ==========================  ======

Files may be ``.nii.gz`` or uncompressed ``.nii``, and one folder may mix layouts (each case
folder is detected on its own). The BRATS 2013/2015 form is recognised by its ``OTMultiClass``
or ``brainmask`` file, so a folder of ``T1c.nii.gz``, ``Flair.nii.gz`` and
``segmentation.nii.gz`` is read as ``named``. Where detection cannot work, give explicit glob
patterns (``find_cases(root, patterns={"t1ce": "*post*", "flair": "*fl*", "seg": "*roi*"})``,
CLI ``--t1ce-pattern`` / ``--flair-pattern`` / ``--seg-pattern``). A folder that holds NIfTI
files but no recognisable case raises :class:`~fuse4seg.data.find.DataError` listing the
files found and the patterns tried. A file role that two files fit (``X_seg.nii.gz`` beside
``X_model_seg.nii.gz``, or ``X_flair.nii`` beside ``X_flair.nii.gz``) makes the case a bad one
whose error names both, rather than taking one of them unsaid. A volume whose voxels are not
one real number each (RGB, complex) is refused with its dtype. The ``named`` layout's label
scheme is read from the
label values present (the paper's data, BraTS 2021, uses 4 for ET; a file without 4 is read
as 0–3 with 3 = ET).

Every case is returned as a :class:`Case` whose ``seg`` holds canonical labels (0 background, 1
NCR, 2 ED, 3 ET; see :mod:`fuse4seg.data.labels`). Every problem a user meets in practice — a
missing modality, a shape or affine mismatch, NaN/inf, an all-zero volume, label values outside
the scheme, an unreadable or truncated file, two files for one role — raises
:class:`~fuse4seg.data.find.DataError` naming the case and the file. ``fuse4seg data check DIR``
runs all of these checks over a folder.

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

import hashlib
import io
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.data.find import (  # noqa: F401  (part of this module's API)
    LAYOUTS,
    MSD_CHANNELS,
    NAMED_PATTERNS,
    NIFTI,
    SCHEME_OF_LAYOUT,
    CaseFiles,
    DataError,
    detect_layout,
    expected_names,
    find_cases,
)
from fuse4seg.data.labels import (
    CANONICAL_NAMES,
    SCHEMES,
    LabelError,
    label_counts,
    to_canonical,
)

__all__ = [
    "LAYOUTS",
    "Case",
    "CaseFiles",
    "DataError",
    "check_case",
    "check_dataset",
    "check_table",
    "detect_layout",
    "find_cases",
    "guess_scheme",
    "load_case",
    "load_volume",
    "normalize_intensity",
]

@dataclass
class Case:
    """One case in canonical form (see the module docstring)."""

    case_id: str
    layout: str
    scheme: str
    t1ce: np.ndarray  # float32 (X, Y, Z), raw intensities (read-only when the file is float32)
    flair: np.ndarray  # float32 (X, Y, Z), raw intensities (read-only likewise)
    seg: np.ndarray | None  # uint8 (X, Y, Z), canonical labels 0..3
    brain_mask: np.ndarray  # bool (X, Y, Z)
    affine: np.ndarray  # (4, 4)
    header: Any  # nibabel header of the T1ce file
    files: CaseFiles | None = None
    checksums: dict[str, str] = field(default_factory=dict, repr=False)
    """SHA-1 of each file read (``t1ce``, ``flair``, ``seg``, ``mask``), from the same bytes
    that were decoded."""
    _inside: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.t1ce.shape)

    def brain_values(self, name: str) -> np.ndarray:
        """The in-brain voxels of ``"t1ce"`` or ``"flair"`` as float32, in the order of
        ``volume.T[brain_mask.T]`` (memory order for NIfTI's Fortran-ordered arrays; any
        order gives the same percentiles). Extracted once, then reused."""
        if name not in self._inside:
            volume = np.asarray(getattr(self, name), dtype=np.float32)
            self._inside[name] = volume.T.reshape(-1)[self._brain_index()]
        return self._inside[name]

    def _brain_index(self) -> np.ndarray:
        """Flat indices of the brain voxels in ``brain_mask.T`` (computed once)."""
        if "index" not in self._inside:
            self._inside["index"] = np.flatnonzero(self.brain_mask.T)
        return self._inside["index"]

    def intensity_range(self, name: str, percentiles=(0.5, 99.5)) -> tuple[Any, Any]:
        """The (low, high) in-brain percentiles of ``"t1ce"`` or ``"flair"`` that
        :func:`normalize_intensity` maps to 0 and 1."""
        return _percentile_range(self.brain_values(name), percentiles)

    def normalized_slices(self, percentiles, slices, dtype=np.float16) -> tuple[np.ndarray, ...]:
        """``(t1ce, flair)`` as ``(len(slices), X, Y)`` arrays of ``dtype``: the axial
        ``slices`` of :meth:`normalized` (float32) cast to ``dtype``, written voxel by voxel
        from the brain values (nothing else is computed or copied)."""
        slices = np.asarray(slices, dtype=np.int64)
        x, y, z = self.brain_mask.shape
        index = self._brain_index()  # into (Z, Y, X), z-major: slice by slice
        per_slice = np.count_nonzero(self.brain_mask, axis=(0, 1))
        zi = np.repeat(np.arange(z), per_slice)
        in_plane = index - zi * (x * y)  # y·X + x
        to_xy = (np.arange(x * y) % x) * y + np.arange(x * y) // x  # y·X + x -> x·Y + y
        row = np.full(z, -1, dtype=np.int64)
        row[slices] = np.arange(slices.size)
        dest = row[zi] * (x * y) + to_xy[in_plane]  # into (K, X, Y)
        if slices.size and np.array_equal(slices, np.arange(slices[0], slices[-1] + 1)):
            start = int(per_slice[: slices[0]].sum())
            kept = slice(start, start + int(per_slice[slices].sum()))  # one run of voxels
        else:
            kept = row[zi] >= 0
        dest = dest[kept]
        out = []
        for name in ("t1ce", "flair"):
            lo, hi = self.intensity_range(name, percentiles)
            values = np.subtract(self.brain_values(name)[kept], lo)  # as normalize_intensity
            values /= hi - lo
            np.clip(values, 0.0, 1.0, out=values)
            volume = np.zeros((slices.size, x, y), dtype=dtype)
            volume.reshape(-1)[dest] = values.astype(np.float32).astype(dtype)
            out.append(volume)
        return tuple(out)

    def normalized(self, percentiles: tuple[float, float] = (0.5, 99.5), slices=None):
        """``(t1ce, flair)`` scaled to [0, 1] inside the brain: the values of
        :func:`normalize_intensity`, computed on the brain voxels only.

        ``slices``: the axial indices to return (``volume[:, :, slices]``); the percentiles
        still come from the whole brain. The arrays are Fortran-ordered views.
        """
        out = []
        for name in ("t1ce", "flair"):
            lo, hi = self.intensity_range(name, percentiles)
            values = np.clip((self.brain_values(name) - lo) / (hi - lo), 0.0, 1.0)
            volume_t = np.zeros(self.brain_mask.shape[::-1], dtype=np.float32)  # (Z, Y, X)
            volume_t.reshape(-1)[self._brain_index()] = values.astype(np.float32)
            out.append((volume_t if slices is None else volume_t[slices]).T)
        return tuple(out)


# ---------------------------------------------------------------------------------------------
# Reading


def _decode(raw: bytes, path: Path):
    """A NIfTI-1/2 image from the bytes of a ``.nii`` or ``.nii.gz`` file, or ``None`` when the
    bytes are not one (the caller then falls back on ``nibabel.load``, except for gzip data
    that fails zlib's checks, which is damaged).

    A gzip file is inflated in one call into a buffer of the size its trailer announces (half
    the time of reading it through ``gzip.GzipFile``); the NIfTI decoder then reads the result
    in place. Raises what zlib or nibabel raise for corrupt or truncated data."""
    import nibabel as nib

    if raw[:2] == b"\x1f\x8b":
        size = int.from_bytes(raw[-4:], "little") if len(raw) >= 4 else 0
        data = zlib.decompress(raw, 31, max(size, 1 << 16))
    else:
        data = raw
    head = data[:4]
    for klass, size in ((nib.Nifti1Image, 348), (nib.Nifti2Image, 540)):
        if head in (size.to_bytes(4, "little"), size.to_bytes(4, "big")):
            return klass.from_bytes(data), data
    return None, data


def _image_array(image, data: bytes) -> np.ndarray:
    """The voxels of an image decoded by :func:`_decode`: a read-only view of ``data`` in the
    file's dtype when the file is unscaled, else float32 as nibabel scales them."""
    proxy = image.dataobj
    if not (proxy.slope == 1 and proxy.inter == 0):
        return np.asarray(proxy, dtype=np.float32)  # scaled: as load_volume did
    dtype, shape, offset = np.dtype(proxy.dtype), tuple(proxy.shape), int(proxy.offset)
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dtype.itemsize > len(data):
        return np.asanyarray(proxy)  # nibabel raises the truncation error
    return np.ndarray(shape, dtype=dtype, buffer=data, offset=offset, order=proxy.order)


def _scaled_above(image, data: bytes, threshold: float) -> np.ndarray | None:
    """``float32 voxels > threshold`` for a *scaled* integer file (e.g. a brain mask stored as
    int32 with a slope), or ``None`` (then read it the plain way).

    Scaling ``stored * slope + inter`` and rounding are monotonic in the stored value, so the
    voxels above the threshold are those whose stored value is at or past one cut-off, which a
    bisection over the stored range finds by letting nibabel scale single values (its own code,
    on a one-voxel proxy). The same booleans as scaling every voxel, at one comparison each."""
    from nibabel.arrayproxy import ArrayProxy

    proxy = image.dataobj
    dtype = np.dtype(proxy.dtype)
    slope, inter = float(np.asarray(proxy.slope)), float(np.asarray(proxy.inter))
    if (slope == 1 and inter == 0) or dtype.kind not in "iu":
        return None
    if not (math.isfinite(slope) and math.isfinite(inter)):
        return None
    shape, offset = tuple(proxy.shape), int(proxy.offset)
    if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(data):
        return None
    stored = np.ndarray(shape, dtype=dtype, buffer=data, offset=offset, order=proxy.order)
    if stored.size == 0:
        return None

    def above(value: int) -> bool:
        one = np.array([value]).astype(dtype)
        tiny = ArrayProxy(io.BytesIO(one.tobytes()), ((1,), dtype, 0, proxy.slope, proxy.inter))
        return bool(np.asarray(tiny, dtype=np.float32)[0] > threshold)

    lo, hi = int(stored.min()), int(stored.max())
    rising = slope >= 0
    a, b = lo, hi + 1  # the first stored value where above() flips from its value at lo
    first = above(lo)
    while a < b:
        m = (a + b) // 2
        if above(m) != first:
            b = m
        else:
            a = m + 1
    if a > hi:  # no flip: the same answer everywhere
        return np.full(shape, first, dtype=bool, order="F")
    if first == rising:  # slope and answer disagree: not monotonic as assumed
        return None
    return stored >= a if rising else stored < a


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _read(path: Path, what: str, raw: bytes | None = None, above: float | None = None):
    """``(voxels in the file's own dtype, affine, header, SHA-1 of the file)``, reading the
    file once (or using ``raw``, its bytes). Integer data is not converted; float data is
    checked for NaN/inf. ``above``: return ``float32 voxels > above`` (bool) instead.

    Raises:
        DataError: missing, unreadable or truncated file; NaN or inf values.
    """
    import nibabel as nib

    path = Path(path)
    if raw is None:
        if not path.exists():
            raise DataError(f"{path}: {what} file does not exist")
        if path.is_dir():
            raise DataError(f"{path}: the {what} file is a folder")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: the {what} file cannot be read ({exc})") from exc
    digest = hashlib.sha1(raw).hexdigest()
    damaged = None
    try:
        try:
            image, data = _decode(raw, path)
            if image is None:
                raise ValueError("not NIfTI-1/2")
            _check_dtype(path, image, what)
            _check_axial(path, image.affine, what)
            array = None if above is None else _scaled_above(image, data, above)
            if array is not None:
                return array, np.asarray(image.affine, dtype=np.float64), image.header, digest
            array = _image_array(image, data)
        except DataError:  # a readable file fuse4seg cannot use (_check_axial)
            raise
        except zlib.error as exc:
            # the gzip stream fails its own checks (its CRC-32, a bad block, a cut-off end):
            # the bytes are damaged. nibabel would read such a file without looking at the
            # checksum at its end, and train on altered voxels; so no fallback here.
            damaged = exc
        except (*_READ_ERRORS, nib.filebasedimages.ImageFileError):
            image = nib.load(str(path))  # anything else nibabel reads, or its own error
            _check_dtype(path, image, what)
            _check_axial(path, image.affine, what)
            array = np.asarray(image.dataobj, dtype=np.float32)
    except DataError:
        raise
    except (*_READ_ERRORS, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({exc})") from exc
    if damaged is not None:
        raise DataError(
            f"{path}: unreadable or truncated NIfTI file: damaged gzip data ({damaged}); "
            "copy the file again from its source"
        ) from damaged
    if not np.issubdtype(array.dtype, np.integer):
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise DataError(f"{path}: {bad} voxel{'s are' if bad != 1 else ' is'} NaN or inf")
    if above is not None:
        array = (array if array.dtype.kind in "iu" else _as_float32(array)) > above
    return array, np.asarray(image.affine, dtype=np.float64), image.header, digest


def _check_dtype(path: Path, image, what: str) -> None:
    """Refuse a volume whose voxels are not one real number each: RGB or RGBA (a structured
    dtype, which no float conversion reads) and complex data (whose imaginary part a
    conversion would drop with only numpy's warning, naming no file).

    Raises:
        DataError: names the file, its stored dtype and what fuse4seg reads.
    """
    dtype = np.dtype(image.get_data_dtype())
    if dtype.kind not in "biuf":
        kind = {"c": "complex", "V": "multi-field (RGB or RGBA)"}.get(
            dtype.kind, dtype.kind)
        raise DataError(
            f"{path}: the {what} file stores {kind} voxels ({dtype}); fuse4seg reads one "
            "integer or floating-point value per voxel: convert it to a grey-level (or label) "
            "volume first"
        )


def _check_axial(path: Path, affine: np.ndarray, what: str) -> None:
    """Refuse a volume whose third voxel axis is not the superior–inferior one.

    Every step of fuse4seg (``data prepare``, ``predict``, ``evaluate``) takes axial slices
    along the third axis, as BraTS stores its volumes; the in-plane orientation varies between
    BraTS releases (L, P in 2021, L, A in 2023) and is left as it is. A volume stored sagittally
    or coronally would be cut into the wrong slices, and give wrong labels without any error.
    An affine whose axes cannot be told (nibabel returns no code) is let through.

    Raises:
        DataError: names the file and its axis codes.
    """
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    except (ValueError, np.linalg.LinAlgError):
        return
    if len(codes) > 2 and codes[2] in ("L", "R", "A", "P"):
        axes = ", ".join(str(c) for c in codes)
        raise DataError(
            f"{path}: the {what}'s third voxel axis runs {codes[2]} (axes {axes}), not "
            "superior-inferior; fuse4seg takes axial slices along the third axis, as BraTS "
            "stores them: reorient the volume first (nibabel's as_closest_canonical, or FSL's "
            "fslreorient2std)"
        )


def load_volume(path: str | Path, what: str = "volume"):
    """Read a NIfTI file as float32 with its affine and header.

    Raises:
        DataError: missing, unreadable or truncated file; NaN or inf values.
    """
    data, affine, header, _ = _read(Path(path), what)
    data = np.asarray(data, dtype=np.float32)
    if not data.flags.writeable:
        data = data.copy()
    return data, affine, header


def _as_float32(array: np.ndarray) -> np.ndarray:
    """float32 voxels (what ``load_volume`` returns), a view when they already are."""
    return np.asarray(array, dtype=np.float32)


def guess_scheme(seg: np.ndarray) -> str:
    """The label scheme of a ``named`` case from its values: 4 present → BraTS 2021 (with 3 as
    well → the BRATS 2013/2015 form), otherwise BraTS 2023+ (0–3, 3 = ET)."""
    values = np.asarray(seg)
    has4 = bool(np.any(values == 4))
    if has4:
        return "brats2013" if bool(np.any(values == 3)) else "brats2021"
    return "brats2023"


def _canonical_seg(raw: np.ndarray, scheme: str, where: str) -> np.ndarray:
    """:func:`to_canonical` of a label volume read in its file's dtype, fast when the labels
    are integers 0..255 (the usual case): the maximum and a test for each value below it that
    the scheme lacks show whether anything is out of the scheme (then a bincount lists the
    values for ``to_canonical``'s error); the few labels the scheme renumbers are rewritten in
    place. Anything else goes through ``to_canonical`` on float32 voxels, as before."""
    small = None
    if raw.dtype == np.uint8:
        small = raw
    elif raw.size and raw.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            small = raw.astype(np.uint8)  # exact iff every value is an integer in 0..255
        if not (small == raw).all():
            small = None  # to_canonical names the bad values
    elif raw.size and raw.dtype.kind in "iu" and 0 <= raw.min() and raw.max() <= 255:
        small = raw.astype(np.uint8)
    if small is None:
        return to_canonical(_as_float32(raw), scheme, where=where)
    mapping = SCHEMES.get(scheme, {})
    top = int(small.max()) if small.size else 0
    outside = [v for v in range(top + 1) if v not in mapping]
    if top > max(mapping, default=-1) or any((small == v).any() for v in outside):
        present = np.flatnonzero(np.bincount(small.ravel(order="K"), minlength=256))
    else:  # every stored value is in the scheme: no need to count them
        present = np.array([v for v in sorted(mapping) if v <= top], dtype=np.int64)
    lut = np.zeros(256, dtype=np.uint8)
    lut[present] = to_canonical(present, scheme, where=where)  # raises naming bad values
    moved = [int(v) for v in present if lut[v] != v]
    if len(moved) > 3:
        return lut[small.T].T  # memory order in, memory order out
    out = small.copy(order="K")
    for v in moved:
        np.copyto(out, lut[v], where=small == v)
    return out


def _require(files: CaseFiles, key: str, what: str) -> Path:
    path = files.paths.get(key)
    if path is None:
        raise DataError(_missing(files, key, what))
    return path


def _missing(files: CaseFiles, key: str, what: str) -> str:
    """The error of a case without its ``key`` file: the file names looked for, if the
    layout has them, and the pattern flag that names a file called otherwise."""
    names = expected_names(files.layout, key)
    if not names:
        return f"case {files.case_id}: missing {what} file ({files.layout} layout)"
    return (f"case {files.case_id}: missing {what} file: no {names} in its folder "
            f"({files.layout} layout); rename the file, or give --{key}-pattern")


def load_case(
    folder: str | Path | CaseFiles,
    layout: str | None = None,
    require_seg: bool = True,
    raw: dict[str, bytes] | None = None,
) -> Case:
    """Read one case: T1ce, FLAIR, canonical segmentation, brain mask, affine.

    Args:
        folder: a case folder, or a :class:`~fuse4seg.data.find.CaseFiles` from
            :func:`~fuse4seg.data.find.find_cases`.
        layout: read the case with this layout's file names (default: detect).
        require_seg: raise when the segmentation is missing (``False`` for inference).
        raw: the bytes of some of the files, by key (``t1ce``, ``flair``, ``seg``, ``mask``),
            when the caller has read them already (each file is read once).

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
    raw = {} if raw is None else raw
    roles = ("t1ce", "flair", "mask", "seg") if require_seg else ("t1ce", "flair", "mask")
    for key in roles:
        if key in files.problems:  # several files fit, or a pattern fits none: before any read
            raise DataError(f"case {cid}: {files.problems[key]}")
    t1ce_path = _require(files, "t1ce", "T1ce")
    flair_path = _require(files, "flair", "FLAIR")
    checksums: dict[str, str] = {}

    def read(key: str, path: Path, what: str, above: float | None = None):
        data, affine, header, digest = _read(path, what, raw.get(key), above)
        checksums[key] = digest
        return data, affine, header

    if files.layout == "msd":
        data, affine, header = read("t1ce", t1ce_path, "image")
        data = _as_float32(data)
        if data.ndim != 4 or data.shape[3] < 3:
            raise DataError(f"{t1ce_path}: expected a 4-D image (FLAIR, T1w, T1gd, T2w)")
        t1ce, flair = data[..., MSD_CHANNELS["t1ce"]], data[..., MSD_CHANNELS["flair"]]
        t1ce_affine = flair_affine = affine
    else:
        t1ce, t1ce_affine, header = read("t1ce", t1ce_path, "T1ce")
        flair, flair_affine, _ = read("flair", flair_path, "FLAIR")
        t1ce, flair = _as_float32(t1ce), _as_float32(flair)
    for arr, path in ((t1ce, t1ce_path), (flair, flair_path)):
        if arr.ndim != 3:
            raise DataError(f"case {cid}: {path} has {arr.ndim} dimensions, expected 3")
    _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, flair, flair_affine, flair_path)

    mask_path = files.paths.get("mask")
    if mask_path is not None:
        brain, mask_affine, _ = read("mask", mask_path, "brain mask", above=0.5)
        _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, brain, mask_affine, mask_path)
    else:
        brain = (t1ce != 0) | (flair != 0)
    index = np.flatnonzero(brain.T)  # memory order for NIfTI's Fortran-ordered arrays
    any_brain = index.size > 0
    inside = {"index": index}
    for arr, path, name in ((t1ce, t1ce_path, "T1ce"), (flair, flair_path, "FLAIR")):
        values = arr.T.reshape(-1)[index] if any_brain else arr  # as Case.brain_values
        if values.size == 0 or float(values.max()) == float(values.min()):
            raise DataError(f"case {cid}: {name} volume {path} is all zero (or constant)")
        inside[name.lower()] = values
    if not any_brain:
        raise DataError(f"case {cid}: the brain mask is empty ({mask_path or t1ce_path})")

    seg = None
    scheme = files.scheme
    seg_path = files.paths.get("seg")
    if seg_path is None:
        if require_seg:
            raise DataError(_missing(files, "seg", "segmentation"))
    else:
        seg_raw, seg_affine, _ = read("seg", seg_path, "segmentation")
        _check_same_grid(cid, t1ce, t1ce_affine, t1ce_path, seg_raw, seg_affine, seg_path)
        if scheme == "auto":
            scheme = guess_scheme(seg_raw)
        try:
            seg = _canonical_seg(seg_raw, scheme, where=f"case {cid}: {seg_path}")
        except LabelError as exc:
            raise DataError(str(exc)) from exc
    return Case(
        case_id=cid,
        layout=files.layout,
        scheme="brats2021" if scheme == "auto" else scheme,
        t1ce=t1ce,
        flair=flair,
        seg=seg,
        brain_mask=brain,
        affine=t1ce_affine,
        header=header,
        files=files,
        checksums=checksums,
        _inside=inside,
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
    lo, hi = _percentile_range(volume[mask], percentiles)
    return _apply_range(volume, mask, lo, hi)


def _percentile_range(inside: np.ndarray, percentiles) -> tuple[Any, Any]:
    if inside.size == 0:
        raise DataError("cannot normalise: the brain mask is empty")
    lo, hi = np.percentile(inside, percentiles)
    if hi <= lo:
        raise DataError("cannot normalise: no intensity spread inside the brain")
    return lo, hi


def _apply_range(volume, mask, lo, hi, slices=None) -> np.ndarray:
    """``clip((volume - lo) / (hi - lo), 0, 1)`` as float32, 0 outside ``mask``; only the
    axial ``slices`` when given (each voxel's value does not depend on the others)."""
    volume = np.asarray(volume, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if slices is not None:
        volume, mask = volume[:, :, slices], mask[:, :, slices]
    out = np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Checking a dataset


def check_case(files: CaseFiles) -> dict[str, Any]:
    """Load one case and summarise it: ``{"case_id", "layout", "scheme", "shape",
    "label_counts", "errors"}`` (errors empty when the case is good; ``scheme``: the label
    scheme read, :func:`guess_scheme`'s for a ``named`` case)."""
    summary: dict[str, Any] = {
        "case_id": files.case_id,
        "layout": files.layout,
        "scheme": None,
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
    summary["scheme"] = case.scheme
    if case.seg.dtype == np.uint8 and int(case.seg.max(initial=0)) < len(CANONICAL_NAMES):
        # label_counts without its int64 copy of the volume: one comparison per label
        counts = [np.count_nonzero(case.seg == c) for c in range(1, len(CANONICAL_NAMES))]
        counts.insert(0, case.seg.size - sum(counts))
        summary["label_counts"] = {n: int(c) for n, c in zip(CANONICAL_NAMES, counts,
                                                               strict=True)}
    else:
        summary["label_counts"] = label_counts(case.seg)
    return summary


def check_dataset(
    root: str | Path,
    layout: str | None = None,
    progress: bool = False,
    workers: int = 1,
    patterns: dict[str, str] | None = None,
):
    """Run :func:`check_case` over every case under ``root``; a list of summaries, in case
    order. ``workers > 1``: that many processes check the cases (the same list)."""
    from fuse4seg.utils import case_map

    cases = find_cases(root, layout, patterns)
    with case_map(check_case, cases, workers, progress, "checking cases") as results:
        return list(results)


def check_table(summaries: list[dict[str, Any]]) -> list[str]:
    """The table ``fuse4seg data check`` prints for :func:`check_dataset`'s summaries: per
    case its layout, label scheme, shape and NCR/ED/ET voxels, or its first error; the numbers
    of good and bad cases; a note where a ``named`` case with a 3 and no 4 was read as BraTS
    2023+ (a BRATS 2013/2015 map without ET, whose 3 is non-enhancing, reads the same)."""
    lines = [f"{'case':<28} {'layout':<10} {'scheme':<10} {'shape':<16} {'NCR':>8} {'ED':>8} "
             f"{'ET':>8}"]
    for s in summaries:
        if s["errors"]:
            first = s["errors"][0].removeprefix(f"case {s['case_id']}: ")
            lines.append(f"{s['case_id']:<28} {s['layout']:<10} BAD: {first}")
            continue
        c, shape = s["label_counts"], "x".join(map(str, s["shape"]))
        lines.append(f"{s['case_id']:<28} {s['layout']:<10} {s.get('scheme') or '-':<10} "
                     f"{shape:<16} {c['NCR']:>8} {c['ED']:>8} {c['ET']:>8}")
    bad = sum(bool(s["errors"]) for s in summaries)
    lines.append(f"{len(summaries) - bad} good, {bad} bad")
    guessed = [s["case_id"] for s in summaries if not s["errors"] and s["layout"] == "named"
               and s.get("scheme") == "brats2023" and s["label_counts"]["ET"] > 0]
    if guessed:
        shown = ", ".join(guessed[:3]) + (" and more" if len(guessed) > 3 else "")
        lines.append(
            f"note: {len(guessed)} named case(s) ({shown}) have labels 1-3 and no 4, read as "
            "BraTS 2023+ (3 = enhancing tumour). If their 3 is non-enhancing tumour (the "
            "BRATS 2013/2015 form without enhancing tumour), name the files T1c*, Flair* and "
            "OTMultiClass* (layout brats2013) to have them read so")
    return lines
