"""Image-fusion pairs (PNG): the Harvard atlas pairs and the GFP / phase-contrast pairs.

Two layouts are read, both matched by file name:

- Harvard (``PAIR/{train,test}/<MOD>/<name>.png``, e.g. ``PET-MRI/test/PET/25015.png`` beside
  ``PET-MRI/test/MRI/25015.png``): **source A is the MRI**, source B the other modality (CT grey,
  PET and SPECT pseudo-colour RGB).
- GFP-PC (``gfp/{GFP,PC}/<name>.png``): **source A is the phase-contrast image** (grey, the
  structure, the MRI's role), source B the green-fluorescent-protein image (colour, the function,
  the PET's role). Papers write "GFP-PC" in either order; we keep "A = the grey structural
  image" for every benchmark so a fusion rule sees the same roles everywhere.

Colour handling (chapter 5, ``book/05_fusion_benchmarks.md``): a colour source is split into
BT.601 full-range Y, Cb, Cr; fusion works on Y only and the colour result puts B's chroma back
(:func:`colorize`). The Y channel used for fusion and for every metric is made exactly as the
fusion literature's common evaluator does it (CDDFuse ``image_read_cv2(path, 'GRAY')``): luma
``0.299 R + 0.587 G + 0.114 B`` computed in float32, rounded half-to-even, stored as uint8
(:func:`read_grey`). This is *not* bit-identical to OpenCV's ``IMREAD_GRAYSCALE`` (libpng's
fixed-point conversion differs by ±1 in thousands of pixels), and it is what the reference
values in the project's fusion-metric tests were computed on.

Images are read with Pillow; this module needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "HARVARD_KINDS",
    "ImagePair",
    "PairPaths",
    "SourceImage",
    "colorize",
    "find_gfp_pairs",
    "find_harvard_pairs",
    "find_pairs",
    "load_pair",
    "read_grey",
    "read_image",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]

HARVARD_KINDS: dict[str, str] = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}
"""Harvard pair folder -> the modality of source B (source A is always ``MRI``)."""

_SPLITS = ("train", "test")

# BT.601 luma weights, as float32 like the reference reader (cv2.cvtColor on float32 input).
_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))


# --------------------------------------------------------------------------- colour


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """BT.601 full-range ("JPEG") RGB -> YCbCr, on the 0..255 scale.

    ``Y = 0.299 R + 0.587 G + 0.114 B``, ``Cb = 128 + (B - Y) / 1.772``,
    ``Cr = 128 + (R - Y) / 1.402``; no footroom/headroom (Y spans 0..255 like the input).

    Args:
        rgb: ``(H, W, 3)`` array (any real dtype), 0..255.

    Returns:
        ``(H, W, 3)`` float64 array (Y, Cb, Cr), not rounded.

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)``.

    Explained in chapter 5 (``book/05_fusion_benchmarks.md``).
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_ycbcr: expected an (H, W, 3) array, got shape {rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 + (b - y) / 1.772
    cr = 128.0 + (r - y) / 1.402
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr` (BT.601 full range).

    Args:
        ycbcr: ``(H, W, 3)`` array (Y, Cb, Cr), 0..255.

    Returns:
        ``(H, W, 3)`` float64 RGB, neither clipped nor rounded (use :func:`colorize` for a
        displayable uint8 image).

    Raises:
        ValueError: ``ycbcr`` is not ``(H, W, 3)``.
    """
    ycbcr = np.asarray(ycbcr, dtype=np.float64)
    if ycbcr.ndim != 3 or ycbcr.shape[-1] != 3:
        raise ValueError(f"ycbcr_to_rgb: expected an (H, W, 3) array, got shape {ycbcr.shape}")
    y, cb, cr = ycbcr[..., 0], ycbcr[..., 1] - 128.0, ycbcr[..., 2] - 128.0
    r = y + 1.402 * cr
    b = y + 1.772 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.stack([r, g, b], axis=-1)


# --------------------------------------------------------------------------- reading


def _open(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                return np.asarray(im).copy()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                raise ValueError(
                    f"{path}: {im.mode} images are not supported; fusion pairs must be 8-bit "
                    "grey or RGB PNGs"
                )
            return np.asarray(im.convert("RGB")).copy()  # palette, LA, RGBA, ...
    except UnidentifiedImageError as exc:
        if path.name.lower().endswith((".nii", ".nii.gz")):  # predict's fused.nii.gz
            raise ValueError(
                f"{path}: a NIfTI volume; fusion metrics read 2-D images (PNG, JPEG, TIFF, "
                "8-bit grey or RGB). Save the axial slices to score as PNG files first"
            ) from exc
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    except (OSError, SyntaxError, EOFError) as exc:  # truncated or damaged data (Pillow's errors)
        raise ValueError(f"{path}: unreadable or truncated image ({exc})") from exc


def _luma_uint8(rgb: np.ndarray) -> np.ndarray:
    """float32 BT.601 luma, rounded half-to-even (the CDDFuse/OpenCV float path)."""
    rgb = rgb.astype(np.float32)
    y = rgb[..., 2] * _LUMA[2] + rgb[..., 1] * _LUMA[1] + rgb[..., 0] * _LUMA[0]
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def read_grey(path: str | Path) -> np.ndarray:
    """Read a PNG as the grey uint8 image every fusion metric in this project is computed on.

    A grey image is returned as stored. A colour image becomes its BT.601 luma computed in
    float32 and rounded half-to-even: exactly CDDFuse's ``image_read_cv2(path, 'GRAY')``
    (``np.round(cv2.cvtColor(cv2.imread(p).astype('float32'), cv2.COLOR_BGR2GRAY))``), which is
    the reader behind the published numbers we compare with (chapter 5, appendix).

    Args:
        path: a PNG (8-bit grey, RGB, RGBA or palette; alpha is dropped).

    Returns:
        ``(H, W)`` uint8.

    Raises:
        FileNotFoundError: no such file. ValueError: not an 8-bit image Pillow can read.
    """
    img = _open(Path(path))
    return img if img.ndim == 2 else _luma_uint8(img)


@dataclass(frozen=True)
class SourceImage:
    """One source of a pair: its fusion channel and, for colour, its chroma.

    Attributes:
        y: ``(H, W)`` uint8, the image fusion works on (:func:`read_grey`).
        cbcr: ``(H, W, 2)`` float32 BT.601 Cb, Cr (0..255 scale) of a colour source, else None.
        path: where it was read from.
    """

    y: np.ndarray
    cbcr: np.ndarray | None
    path: Path

    @property
    def is_colour(self) -> bool:
        return self.cbcr is not None


def read_image(path: str | Path) -> SourceImage:
    """Read one source: grey as is, colour split into Y (uint8, :func:`read_grey`) and Cb, Cr.

    A colour PNG whose three channels are equal is treated as grey (``cbcr`` None).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_grey`.
    """
    path = Path(path)
    img = _open(path)
    if img.ndim == 2:
        return SourceImage(img, None, path)
    if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]):
        return SourceImage(img[..., 0].copy(), None, path)
    cbcr = rgb_to_ycbcr(img)[..., 1:].astype(np.float32)
    return SourceImage(_luma_uint8(img), cbcr, path)


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairPaths:
    """Where one pair lives: ``name`` (file stem), ``a`` and ``b`` paths, ``kind`` and ``split``
    (``"PET-MRI"``/``"test"``; ``"GFP-PC"``/``"all"``)."""

    name: str
    a: Path
    b: Path
    kind: str
    split: str


@dataclass(frozen=True)
class ImagePair:
    """A loaded pair.

    Attributes:
        name, kind, split: as :class:`PairPaths`.
        a: ``(H, W)`` uint8, source A (MRI or phase contrast), grey.
        b: ``(H, W)`` uint8, source B's fusion channel (grey, or the Y of a colour image).
        b_cbcr: ``(H, W, 2)`` float32 chroma of a colour B, else None.
        a_cbcr: the same for A (None for every shipped benchmark).
        paths: the :class:`PairPaths` it came from.
    """

    name: str
    kind: str
    split: str
    a: np.ndarray
    b: np.ndarray
    b_cbcr: np.ndarray | None
    a_cbcr: np.ndarray | None
    paths: PairPaths

    @property
    def shape(self) -> tuple[int, int]:
        return self.a.shape  # type: ignore[return-value]

    @property
    def chroma(self) -> np.ndarray | None:
        """The chroma a colour result gets back: B's if B is colour, else A's, else None."""
        return self.b_cbcr if self.b_cbcr is not None else self.a_cbcr


def _match(dir_a: Path, dir_b: Path, kind: str, split: str) -> list[PairPaths]:
    for d in (dir_a, dir_b):
        if not d.is_dir():
            where = f"{kind} {split}" if split != "all" else kind
            raise FileNotFoundError(f"{d}: no such folder (the {where} images: {d.name}/"
                                    "<name>.png)")
    names_a = {p.stem: p for p in dir_a.glob("*.png")}
    names_b = {p.stem: p for p in dir_b.glob("*.png")}
    only_a, only_b = sorted(set(names_a) - set(names_b)), sorted(set(names_b) - set(names_a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"in {dir_a} but not in {dir_b}: {', '.join(n + '.png' for n in only_a)}")
        if only_b:
            parts.append(f"in {dir_b} but not in {dir_a}: {', '.join(n + '.png' for n in only_b)}")
        raise ValueError(f"{kind} {split}: unmatched file names; " + "; ".join(parts))
    if not names_a:
        raise ValueError(f"{kind} {split}: no .png images in {dir_a}")
    return [PairPaths(n, names_a[n], names_b[n], kind, split) for n in sorted(names_a)]


def find_harvard_pairs(
    root: str | Path, kind: str = "PET-MRI", split: str = "test"
) -> list[PairPaths]:
    """List the pairs of one Harvard kind and split, sorted by name.

    Args:
        root: the folder holding ``CT-MRI/``, ``PET-MRI/``, ``SPECT-MRI/`` (or the kind folder
            itself, e.g. ``.../PET-MRI``).
        kind: ``"CT-MRI"``, ``"PET-MRI"`` or ``"SPECT-MRI"``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``PairPaths`` with ``a`` = the MRI, ``b`` = the CT/PET/SPECT image.

    Raises:
        ValueError: unknown kind or split; a name present on one side only (every such file is
            named); an empty folder. FileNotFoundError: a missing folder.
    """
    if kind not in HARVARD_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {sorted(HARVARD_KINDS)}")
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: choose one of {list(_SPLITS)}")
    root = Path(root)
    base = root if root.name == kind else root / kind
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base}: Harvard {kind} folder not found (expected {kind}/"
            f"{{train,test}}/{{MRI,{HARVARD_KINDS[kind]}}}/<name>.png)"
        )
    return _match(base / split / "MRI", base / split / HARVARD_KINDS[kind], kind, split)


def find_gfp_pairs(root: str | Path) -> list[PairPaths]:
    """List the GFP-PC pairs in ``root/{GFP,PC}/<name>.png``, sorted by name.

    ``a`` is the phase-contrast image, ``b`` the GFP image (see the module docstring); the split
    is ``"all"`` (the set is too small to split; chapter 5 evaluates by leave-one-out).

    Raises:
        FileNotFoundError, ValueError: as :func:`find_harvard_pairs`.
    """
    root = Path(root)
    return _match(root / "PC", root / "GFP", "GFP-PC", "all")


def find_pairs(root: str | Path, kind: str, split: str = "test") -> list[PairPaths]:
    """:func:`find_harvard_pairs` for a Harvard kind, :func:`find_gfp_pairs` for ``"GFP-PC"``
    (``split`` is ignored there)."""
    if kind == "GFP-PC":
        return find_gfp_pairs(root)
    return find_harvard_pairs(root, kind, split)


def load_pair(paths: PairPaths) -> ImagePair:
    """Read both images of a pair (:func:`read_image`) and check they match.

    Raises:
        ValueError: the two images differ in size (both files and sizes are named).
        FileNotFoundError: a file is missing.
    """
    a, b = read_image(paths.a), read_image(paths.b)
    if a.y.shape != b.y.shape:
        raise ValueError(
            f"{paths.kind} pair {paths.name!r}: size mismatch, {paths.a} is "
            f"{a.y.shape[1]}x{a.y.shape[0]} but {paths.b} is {b.y.shape[1]}x{b.y.shape[0]}"
        )
    return ImagePair(paths.name, paths.kind, paths.split, a.y, b.y, b.cbcr, a.cbcr, paths)


def colorize(fused_y: np.ndarray, chroma: np.ndarray | None) -> np.ndarray:
    """Put the chroma back on a fused Y channel (chapter 5, Figure 5).

    Args:
        fused_y: ``(H, W)`` fused luma on 0..255 (uint8 or float; a float image with max <= 1
            is NOT rescaled: pass 0..255).
        chroma: ``(H, W, 2)`` Cb, Cr (``ImagePair.chroma``), or None for a grey result.

    Returns:
        ``(H, W, 3)`` uint8 RGB (clipped to 0..255 and rounded); a grey result is repeated over
        the three channels.

    Raises:
        ValueError: shapes do not match.
    """
    y = np.asarray(fused_y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"colorize: fused_y must be (H, W), got shape {y.shape}")
    if chroma is None:
        rgb = np.repeat(y[..., None], 3, axis=-1)
    else:
        if chroma.shape != (*y.shape, 2):
            raise ValueError(
                f"colorize: chroma shape {chroma.shape} does not match fused_y {y.shape} (+ 2)"
            )
        rgb = ycbcr_to_rgb(np.concatenate([y[..., None], chroma.astype(np.float64)], axis=-1))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
