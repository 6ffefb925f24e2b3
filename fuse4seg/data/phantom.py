"""The built-in phantom: BraTS-like T1ce / FLAIR / segmentation cases made offline from MNI152.

Why a phantom? The book must run on a fresh laptop with no BraTS download, yet the point of
Fuse4Seg (paper §1, §3) only shows when the two sources carry *complementary* information: no
single modality shows all three tumour sub-regions. The phantom reproduces exactly that property
of real BraTS data, with a known ground truth, in a few seconds per case. Explained in chapter 1
(``book/01_data.md``).

Anatomy
    The MNI152 ICBM 2009a templates that ship *inside the nilearn wheel* (no download):
    ``load_mni152_template`` (skull-stripped T1, 1 mm, 197×233×189), ``load_mni152_gm_template``
    and ``load_mni152_wm_template`` (tissue probability maps, same grid) and
    ``load_mni152_brain_mask`` (T1 > 0.2). CSF = clip(brain − GM − WM, 0, 1). The template is
    translated (no resampling: both grids are 1 mm) so that its brain sits in the centre of the
    BraTS grid 240×240×155; the brain spans exactly 155 axial slices. Each case deforms the
    anatomy with a smooth random displacement field (cubic B-spline on a 24 mm control grid,
    largest displacement 2–5 mm, trilinear resampling).

Tumour (one per case)
    Centre: a random voxel of deep white matter (WM probability ≥ 0.9) of one randomly chosen
    hemisphere, above the tentorium. Shape: a randomly rotated ellipsoid (semi-axes 8–20 mm
    times 0.75–1.3 per axis) whose normalised distance ``d`` is perturbed by smooth random noise,
    so the borders are irregular:

    - tumour core (NCR ∪ ET) = ``d + 0.2·n₁ < 1``;
    - necrotic core NCR = core ∩ ``d + 0.25·n₂ < ρ`` (ρ ∈ [0.5, 0.75]); the rest of the core is
      the enhancing rim ET;
    - edema ED = ``d + 0.35·n₃ − 0.8·(WM − 0.5) < E`` (E ∈ [1.5, 2.2]) outside the core, in the
      brain, not in CSF (CSF fraction < 0.5), connected to the core: it spreads irregularly
      and further along white matter than into grey matter. The whole lesion stays in its
      hemisphere (at most 2 mm over the midline: the falx).

    ``n₁, n₂, n₃`` are independent smooth Gaussian fields (unit variance, 8 mm B-spline grid).
    A drawn tumour is kept only if NCR, ED and ET each have at least 500 voxels (else the next
    random tumour is drawn, deterministically).

Contrast model (mean intensity of each tissue, before bias, noise and gain; each column is in
its own arbitrary unit, with white matter = 1 on T1ce; a voxel's value is the partial-volume mix
of its tissue fractions)

    ===================  ======  ======  ==================================================
    tissue               T1ce    FLAIR   why
    ===================  ======  ======  ==================================================
    CSF                  0.25    0.15    dark on both (FLAIR suppresses free water)
    grey matter          0.65    0.85    T1: GM darker than WM; FLAIR: GM brighter than WM
    white matter         1.00    0.65    reference (T1ce)
    edema (ED, 2)        0.85    1.45    barely visible on T1ce, bright on FLAIR
    necrosis (NCR, 1)    0.30    1.25    dark on T1ce, bright on FLAIR
    enhancing (ET, 4)    1.70    1.35    bright on T1ce (contrast agent), bright on FLAIR
    ===================  ======  ======  ==================================================

    So T1ce separates NCR from ET but hardly shows the edema, while FLAIR shows the whole tumour
    (ED ∪ NCR ∪ ET all bright) but cannot separate its sub-regions: only the two together give
    all three labels, as in real BraTS. On top of the table: the anatomical detail of the
    template T1 that the tissue maps miss (its residual after a least-squares fit on the tissue
    fractions, added to T1ce and, with weight −0.3, to FLAIR); ±8 % smooth heterogeneity inside
    the tumour; a little partial volume at tumour borders (Gaussian σ = 0.6 mm); a smooth
    multiplicative bias field exp(quadratic polynomial, about ±10 %) per modality; Rician noise
    (magnitude of the signal plus complex Gaussian noise, σ = 2–4 % of WM); a random gain per case
    (WM ≈ 700–1300 on T1ce, 350–650 on FLAIR). Values are rounded to int16 and set to 0 outside
    the brain, as in the skull-stripped BraTS files.

Files (BraTS 2021 layout, read by :func:`fuse4seg.data.layouts.load_case`)
    ``<out>/<ID>/<ID>_t1ce.nii.gz``, ``<ID>_flair.nii.gz`` (int16) and ``<ID>_seg.nii.gz``
    (uint8, labels 0 background, 1 NCR, 2 ED, 4 ET), 240×240×155, 1 mm isotropic, RAS affine
    whose world coordinates are MNI152 millimetres (voxel ``i`` of the output is template voxel
    ``i − offset``). IDs are ``Phantom_00000``, ``Phantom_00001``, ...; case ``i`` of a dataset
    made with seed ``S`` uses seed ``S * 100003 + i``. Same seed → identical arrays and
    byte-identical files (gzip with mtime 0).

Simplifications (said in chapter 1): no mass effect, no skull, no vessels or choroid plexus
enhancement, one tumour per case, T1 and T2 are not made (Fuse4Seg only uses T1ce and FLAIR).
"""

from __future__ import annotations

import functools
import gzip
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fuse4seg.utils import atomic_write_bytes, case_map

__all__ = [
    "BRATS_SHAPE",
    "CONTRAST",
    "case_id",
    "case_seed",
    "make_phantom_case",
    "write_phantom_dataset",
]

BRATS_SHAPE = (240, 240, 155)
"""Voxel grid of BraTS 2018-2021 (1 mm isotropic)."""

CONTRAST: dict[str, tuple[float, float]] = {
    # tissue -> (T1ce, FLAIR), relative to normal white matter on T1ce (module docstring table)
    "CSF": (0.25, 0.15),
    "GM": (0.65, 0.85),
    "WM": (1.00, 0.65),
    "ED": (0.85, 1.45),
    "NCR": (0.30, 1.25),
    "ET": (1.70, 1.35),
}
"""Mean intensity of each tissue on (T1ce, FLAIR); the contrast model of the module docstring."""

SEED_STRIDE = 100003
"""Case ``i`` of a dataset with seed ``S`` is made with seed ``S * SEED_STRIDE + i``."""

ID_PREFIX = "Phantom"
_TEXTURE_WEIGHT = (1.0, -0.3)  # template-T1 residual added to (T1ce, FLAIR)
_GAIN_RANGE = ((700.0, 1300.0), (350.0, 650.0))  # WM-relative 1.0 -> int16 units (T1ce, FLAIR)
_DEFORM_SPACING = 24.0  # mm, control grid of the anatomy deformation
_DEFORM_MAX_MM = 5.0  # largest displacement of the anatomy deformation (drawn in [2, 5] mm)
_NOISE_SPACING = 8.0  # mm, control grid of the tumour-shape noise
_MIN_VOXELS = 500  # each of NCR, ED, ET must have at least this many voxels
_MAX_TRIES = 20


def case_id(index: int) -> str:
    """``Phantom_00000`` style id of case ``index``."""
    return f"{ID_PREFIX}_{index:05d}"


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a dataset made with ``seed`` (``seed * 100003 + index``)."""
    return int(seed) * SEED_STRIDE + int(index)


# ----------------------------------------------------------------------------------------------
# The MNI152 anatomy (loaded once per process)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """MNI152 maps placed in the BraTS grid, restricted to a box around the brain."""

    box: tuple[slice, slice, slice]  # where the maps sit in the 240×240×155 grid
    gm: np.ndarray  # float32 (bx, by, bz), 0 outside the brain
    wm: np.ndarray
    brain: np.ndarray  # float32 0/1
    texture: np.ndarray  # float32, template T1 residual in units of its WM intensity
    support: np.ndarray  # bool, brain dilated by the largest displacement (+ margin)
    affine: np.ndarray  # (4, 4) RAS, world = MNI mm


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four nilearn maps as float32 arrays plus the template affine (no download)."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    zooms = t1_img.header.get_zooms()[:3]
    if not np.allclose(zooms, 1.0) or not (t1.shape == gm.shape == wm.shape == mask.shape):
        raise RuntimeError(
            f"nilearn's MNI152 maps are not on one 1 mm grid (T1 {t1.shape} at {zooms} mm, "
            f"GM {gm.shape}, WM {wm.shape}, mask {mask.shape}); fuse4seg expects nilearn 0.14"
        )
    return t1, gm, wm, mask, np.asarray(t1_img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    t1, gm, wm, mask, affine = _load_mni152()
    gm = np.where(mask, gm, 0.0).astype(np.float32)
    wm = np.where(mask, wm, 0.0).astype(np.float32)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    # Texture: what the template T1 shows beyond its tissue fractions (least-squares residual).
    design = np.stack([gm[mask], wm[mask], csf[mask]], axis=1)
    coef, *_ = np.linalg.lstsq(design, t1[mask], rcond=None)
    texture = np.zeros_like(t1)
    texture[mask] = (t1[mask] - design @ coef) / coef[1]

    # Translate the template so the brain's bounding box is centred in the BraTS grid.
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    extent = hi - lo
    if np.any(extent > np.array(BRATS_SHAPE)):
        raise RuntimeError(f"MNI152 brain extent {tuple(extent)} does not fit {BRATS_SHAPE}")
    start = (np.array(BRATS_SHAPE) - extent) // 2
    offset = start - lo  # output voxel = template voxel + offset
    margin = int(np.ceil(_DEFORM_MAX_MM)) + 3
    box_lo = np.maximum(start - margin, 0)
    box_hi = np.minimum(start + extent + margin, BRATS_SHAPE)
    src_lo, src_hi = box_lo - offset, box_hi - offset  # the box in template voxels

    def crop(volume: np.ndarray) -> np.ndarray:
        out = np.zeros(tuple(box_hi - box_lo), dtype=np.float32)
        a = np.maximum(src_lo, 0)
        b = np.minimum(src_hi, volume.shape)
        dst = tuple(slice(int(a[k] - src_lo[k]), int(b[k] - src_lo[k])) for k in range(3))
        out[dst] = volume[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        return out

    brain = crop(mask.astype(np.float32))
    support = ndi.binary_dilation(brain > 0, iterations=margin)
    out_affine = affine.copy()
    out_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ offset
    box = tuple(slice(int(box_lo[k]), int(box_hi[k])) for k in range(3))
    return _Anatomy(box, crop(gm), crop(wm), brain, crop(texture), support, out_affine)


# ----------------------------------------------------------------------------------------------
# Smooth random fields (separable cubic B-splines: cheap on 4 M voxels, exactly unit variance)
# ----------------------------------------------------------------------------------------------


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Centred cubic B-spline kernel."""
    t = np.abs(t)
    out = np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, 0.0)
    return np.where((t >= 1) & (t < 2), (2 - t) ** 3 / 6, out)


def _basis(n: int, spacing: float) -> np.ndarray:
    """(n, K) cubic B-spline basis on a control grid of ``spacing`` voxels covering ``n``."""
    knots = np.arange(-2, int(np.ceil((n - 1) / spacing)) + 3) * spacing
    return _bspline3((np.arange(n)[:, None] - knots[None, :]) / spacing)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: float) -> np.ndarray:
    """A smooth Gaussian random field of unit variance everywhere, float32 ``shape``.

    Tensor product of cubic B-splines with i.i.d. N(0, 1) control coefficients, divided by its
    pointwise standard deviation.
    """
    bases = [_basis(n, spacing).astype(np.float32) for n in shape]
    field = rng.standard_normal(tuple(b.shape[1] for b in bases), dtype=np.float32)
    norm = np.ones((), dtype=np.float32)
    for axis, b in enumerate(bases):
        # contract the control axis ``axis`` with the basis: (..., K, ...) -> (..., n, ...)
        field = np.moveaxis(np.tensordot(b, field, axes=([1], [axis])), 0, axis)
        norm = np.multiply.outer(norm, np.sqrt((b**2).sum(axis=1)))
    return (field / norm).astype(np.float32)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """exp(quadratic polynomial) over the box, coordinates in [-1, 1]; float32 ``shape``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, x * z, y * z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3]
    coef = rng.normal(0.0, strength / 3, size=len(terms)).astype(np.float32)
    log_bias = np.zeros(shape, dtype=np.float32)
    for c, t in zip(coef, terms, strict=True):
        log_bias += c * t
    return np.exp(log_bias)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


def _deform(anat: _Anatomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Warp GM, WM, brain and texture with one smooth random displacement field."""
    shape = anat.brain.shape
    amplitude = rng.uniform(2.0, _DEFORM_MAX_MM)
    points = np.nonzero(anat.support)  # only where the warped brain can be
    coords = np.empty((3, points[0].size), dtype=np.float32)
    for k in range(3):
        disp = _smooth_field(rng, shape, _DEFORM_SPACING)[points]
        # unit-variance field: 3 sigma ~ amplitude, clipped so the margin is never exceeded
        coords[k] = points[k] + np.clip(disp * (amplitude / 3), -_DEFORM_MAX_MM, _DEFORM_MAX_MM)
    out = {}
    for name in ("gm", "wm", "brain", "texture"):
        vol = np.zeros(shape, dtype=np.float32)
        vol[points] = ndi.map_coordinates(getattr(anat, name), coords, order=1, mode="constant")
        out[name] = vol
    brain = out["brain"] > 0.5
    out["brain"] = brain
    for name in ("gm", "wm", "texture"):
        out[name] = np.where(brain, out[name], 0.0).astype(np.float32)
    total = out["gm"] + out["wm"]
    over = total > 1.0
    out["gm"][over] /= total[over]
    out["wm"][over] /= total[over]
    out["csf"] = np.where(brain, 1.0 - out["gm"] - out["wm"], 0.0).astype(np.float32)
    return out


def _tumour(
    tissue: dict[str, np.ndarray],
    rng: np.random.Generator,
    world_x: np.ndarray,
    world_z: np.ndarray,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Draw one tumour; returns (box, labels uint8 in the box: 0, 1 NCR, 2 ED, 3 ET).

    ``world_x`` / ``world_z``: MNI coordinate (mm) of each index along x / z of the work box.
    Raises RuntimeError when no tumour with all three regions was found in ``_MAX_TRIES``.
    """
    wm, brain, csf = tissue["wm"], tissue["brain"], tissue["csf"]
    shape = np.array(wm.shape)
    deep_wm = (wm >= 0.9) & (world_z[None, None, :] > -10.0)
    lateral = np.abs(world_x)[:, None, None] >= 10.0
    for _ in range(_MAX_TRIES):
        side = rng.choice([-1.0, 1.0])  # RAS: +x = right hemisphere
        cand = np.argwhere(deep_wm & lateral & (np.sign(world_x)[:, None, None] == side))
        centre = cand[rng.integers(len(cand))]
        axes = rng.uniform(8.0, 20.0) * rng.uniform(0.75, 1.3, size=3)
        rotation = _random_rotation(rng)
        rho = rng.uniform(0.5, 0.75)
        reach = rng.uniform(1.5, 2.2)
        # the edema test below can pass up to d = reach + 0.4 + 0.35·max(n₃): leave room
        half = int(np.ceil(axes.max() * (reach + 1.6))) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, shape)
        box = tuple(slice(int(lo[k]), int(hi[k])) for k in range(3))
        bshape = tuple(int(v) for v in hi - lo)
        grids = np.meshgrid(
            *[np.arange(lo[k], hi[k], dtype=np.float32) - centre[k] for k in range(3)],
            indexing="ij",
            sparse=True,
        )
        # normalised ellipsoid distance in the rotated frame
        d2 = np.zeros(bshape, dtype=np.float32)
        for k in range(3):
            p = sum(float(rotation[j, k]) * grids[j] for j in range(3))
            d2 += (p / np.float32(axes[k])) ** 2
        dist = np.sqrt(d2)
        n1, n2, n3 = (_smooth_field(rng, bshape, _NOISE_SPACING) for _ in range(3))
        in_brain = brain[box]
        core = (dist + 0.2 * n1 < 1.0) & in_brain
        necrosis = core & (dist + 0.25 * n2 < rho)
        wm_box = wm[box]
        edema = (dist + 0.35 * n3 - 0.8 * (wm_box - 0.5) < reach) & in_brain
        edema &= ~core & (csf[box] < 0.5)
        # the falx: the lesion stays in its hemisphere (up to 2 mm over the midline)
        own_side = (side * world_x[box[0]] > -2.0)[:, None, None]
        core &= own_side
        necrosis &= own_side
        edema &= own_side
        # keep the part of the lesion connected to the centre
        components, _ = ndi.label(core | edema)
        centre_label = components[tuple(centre - lo)]
        if centre_label == 0:
            continue
        lesion = components == centre_label
        labels = np.zeros(bshape, dtype=np.uint8)
        labels[lesion & edema] = 2
        labels[lesion & core] = 3
        labels[lesion & necrosis] = 1
        counts = np.bincount(labels.ravel(), minlength=4)
        if min(counts[1], counts[2], counts[3]) >= _MIN_VOXELS:
            return box, labels
    raise RuntimeError(f"no phantom tumour with NCR, ED and ET found in {_MAX_TRIES} tries")


def make_phantom_case(seed: int) -> dict[str, np.ndarray]:
    """Make one phantom case (deterministic for ``seed``); explained in chapter 1.

    Args:
        seed: non-negative integer; the same seed gives identical arrays.

    Returns:
        A dict: ``"t1ce"`` and ``"flair"`` int16 (240, 240, 155); ``"seg"`` uint8 (240, 240,
        155) with the BraTS 2021 labels 0 bg, 1 NCR, 2 ED, 4 ET; ``"affine"`` float64 (4, 4),
        RAS, world = MNI152 mm (the contrast model is in the module docstring).

    Raises:
        ValueError: if ``seed`` is negative or not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    anat = _anatomy()
    rng = np.random.default_rng(int(seed))
    tissue = _deform(anat, rng)
    shape = tissue["brain"].shape

    idx_lo = np.array([s.start for s in anat.box], dtype=np.float64)
    world_x = anat.affine[0, 0] * (np.arange(shape[0]) + idx_lo[0]) + anat.affine[0, 3]
    world_z = anat.affine[2, 2] * (np.arange(shape[2]) + idx_lo[2]) + anat.affine[2, 3]
    tbox, tlabels = _tumour(tissue, rng, world_x, world_z)

    brain = tissue["brain"]
    images = []
    for m in range(2):  # 0: T1ce, 1: FLAIR
        csf_i, gm_i, wm_i = (CONTRAST[t][m] for t in ("CSF", "GM", "WM"))
        img = csf_i * tissue["csf"] + gm_i * tissue["gm"] + wm_i * tissue["wm"]
        img += _TEXTURE_WEIGHT[m] * tissue["texture"]
        images.append(img)

    # Tumour: replace normal tissue by the tumour classes, with a little partial volume.
    lut = np.zeros((2, 4), dtype=np.float32)  # canonical label -> intensity per modality
    for label, name in ((1, "NCR"), (2, "ED"), (3, "ET")):
        lut[:, label] = CONTRAST[name]
    heterogeneity = 1.0 + 0.08 * _smooth_field(rng, tlabels.shape, 5.0)
    lesion = (tlabels > 0).astype(np.float32)
    lesion_soft = ndi.gaussian_filter(lesion, 0.6)
    for m in range(2):
        tumour_img = ndi.gaussian_filter(lut[m][tlabels] * heterogeneity, 0.6)
        region = images[m][tbox]
        region[...] = (1.0 - lesion_soft) * region + tumour_img
    seg = np.zeros(shape, dtype=np.uint8)
    seg[tbox] = tlabels

    # Acquisition: bias field, Rician noise, gain, int16, zero background.
    points = np.nonzero(brain)
    out: dict[str, np.ndarray] = {}
    for m, name in enumerate(("t1ce", "flair")):
        bias = _bias_field(rng, shape, strength=0.1)
        signal = (images[m] * bias)[points]
        sigma = rng.uniform(0.02, 0.04)
        noise = rng.standard_normal((2, signal.size), dtype=np.float32) * np.float32(sigma)
        magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
        gain = rng.uniform(*_GAIN_RANGE[m])
        vol = np.zeros(BRATS_SHAPE, dtype=np.int16)
        box_vol = np.zeros(shape, dtype=np.float32)
        box_vol[points] = np.clip(np.rint(magnitude * gain), 1, np.iinfo(np.int16).max)
        vol[anat.box] = box_vol.astype(np.int16)
        out[name] = vol
    full_seg = np.zeros(BRATS_SHAPE, dtype=np.uint8)
    full_seg[anat.box] = np.where(seg == 3, 4, seg).astype(np.uint8)  # canonical ET 3 -> 4
    out["seg"] = full_seg
    out["affine"] = anat.affine.copy()
    return out


# ----------------------------------------------------------------------------------------------
# Writing a dataset
# ----------------------------------------------------------------------------------------------


def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file as bytes, deterministic (gzip mtime 0), sform/qform = scanner."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_case(job: tuple[str, int, int]) -> tuple[Path, list[int], float]:
    """One case of :func:`write_phantom_dataset` (a top-level function, so a worker process
    can run it): ``(folder, voxel counts per label, seconds)``."""
    out_dir, seed, i = job
    start = time.perf_counter()
    cid = case_id(i)
    case = make_phantom_case(case_seed(seed, i))
    folder = Path(out_dir) / cid
    for name in ("t1ce", "flair", "seg"):
        atomic_write_bytes(folder / f"{cid}_{name}.nii.gz",
                           _nifti_gz_bytes(case[name], case["affine"]))
    counts = np.bincount(case["seg"].ravel(), minlength=5)
    return folder, [int(c) for c in counts], time.perf_counter() - start


def _check_phantom_folder(out_dir: Path) -> None:
    """Refuse an existing ``out_dir`` that is a slice cache, a run, a runs folder or a folder
    of other cases (:func:`write_phantom_dataset`'s Raises), before any case is written."""
    from fuse4seg.data.find import NIFTI

    if not out_dir.is_dir():
        return
    what = None
    if (out_dir / "manifest.json").is_file():
        what = "a prepared slice cache (manifest.json)"
    elif (out_dir / "run.json").is_file() or any(out_dir.glob("*/run.json")):
        what = "a run or a runs folder (run.json)"
    else:
        others = sorted(
            d.name for d in out_dir.iterdir()
            if d.is_dir() and not d.name.startswith("Phantom_")
            and any(f.name.endswith(NIFTI) for f in d.iterdir())
        )
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            what = f"other cases ({shown})"
    if what:
        raise ValueError(f"phantom output {out_dir} holds {what}: write the phantom to a "
                         "folder of its own")


def write_phantom_dataset(
    out_dir: str | Path, cases: int = 8, seed: int = 0, progress: bool = True, workers: int = 1
) -> list[Path]:
    """Write ``cases`` phantom cases in the BraTS 2021 layout under ``out_dir``.

    Case ``i`` is ``<out_dir>/Phantom_<i:05d>/`` with ``_t1ce``, ``_flair`` and ``_seg``
    ``.nii.gz`` files, made by :func:`make_phantom_case` with seed ``seed * 100003 + i``. Each
    file is written atomically (temporary file + rename); existing files are overwritten (the
    same seed gives the same bytes). Explained in chapter 1.

    Args:
        out_dir: output folder (created if missing).
        cases: number of cases, >= 1.
        seed: dataset seed, >= 0.
        progress: print one line per case to stderr.
        workers: write the cases in this many processes. Each case depends only on its own
            seed, so the files are byte-identical to one worker's (tested); 2 workers wrote the
            ``default`` profile's 24 cases in 37 s against 82–89 s for one. ``book/build.py``
            writes with up to 4 (``fuse4seg.book.prepare_phantom``).

    Returns:
        The case folders, in order.

    Stopped part-way (Ctrl-C, an error), it removes the case folders it made and the folders
    it created, so no smaller dataset is left that would pass ``data check`` as whole; case
    folders that were there before are left (rewritten with the same bytes where the seed is
    the same; with another seed, some are then the new seed's).

    Warns when ``out_dir`` holds other ``Phantom_*`` case folders (an earlier call's, with more
    cases): they are left as they are, and anything reading the folder would see them.

    Raises:
        ValueError: if ``cases`` < 1, ``seed`` < 0, ``workers`` < 1, or ``out_dir`` exists and
            is not a folder, or holds what the phantom must not be mixed into: a slice cache
            (``manifest.json``), a run or a runs folder (``run.json``), or other cases (a
            folder of NIfTI files not named ``Phantom_*``).
    """
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ValueError(f"write_phantom_dataset: cases must be an integer >= 1, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"write_phantom_dataset: seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"phantom output {out_dir} exists and is not a folder")
    _check_phantom_folder(out_dir)
    from fuse4seg.utils import missing_folders, remove_empty_folders

    made = missing_folders(out_dir)
    had = {p.name for p in out_dir.glob("Phantom_*")} if out_dir.is_dir() else set()
    folders = []
    jobs = [(str(out_dir), int(seed), i) for i in range(int(cases))]
    try:
        with case_map(_write_case, jobs, workers) as results:
            for i, (folder, counts, seconds) in enumerate(results):
                folders.append(folder)
                if progress:
                    print(
                        f"phantom {i + 1}/{cases}: {folder.name} NCR {counts[1]} ED "
                        f"{counts[2]} ET {counts[4]} voxels ({seconds:.1f} s)",
                        file=sys.stderr,
                    )
    except BaseException:  # Ctrl-C, a full disk: no part of a dataset that passes as whole
        import shutil

        for _, _, i in jobs:
            if case_id(i) not in had:
                shutil.rmtree(out_dir / case_id(i), ignore_errors=True)
        remove_empty_folders(made)
        raise
    made = {f.name for f in folders}
    others = sorted(p.name for p in out_dir.glob("Phantom_*") if p.is_dir() and p.name not in made)
    if others:  # from an earlier call with more cases: every reader would see them too
        import warnings

        warnings.warn(
            f"{out_dir} also holds {len(others)} other phantom case folder(s) ("
            + ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            + f"), so it is a dataset of {len(made) + len(others)} cases, not {len(made)}: "
            "remove them, or write to a new folder",
            stacklevel=2,
        )
    return folders
