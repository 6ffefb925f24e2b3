"""The prepared slice cache: NIfTI volumes → normalised axial slices that training reads fast.

``prepare_cache(data_dir, cache_dir, data_cfg)`` (CLI: ``fuse4seg data prepare DIR --out CACHE``)
reads one case at a time (never the whole dataset in memory), normalises T1ce and FLAIR to
[0, 1] inside the brain (:func:`fuse4seg.data.layouts.normalize_intensity`), keeps the axial
slices with at least ``min_brain_fraction`` brain (every ``slice_stride``-th of them),
down-samples them in-plane by ``downsample`` and centre-crops or zero-pads them to
``crop_size``. Per case it writes three ``.npy`` arrays that the :class:`SliceDataset` opens
memory-mapped:

- ``cases/<id>.t1ce.npy`` and ``cases/<id>.flair.npy``: float16 ``(n, S, S)`` (float16 keeps
  1,251 BraTS cases near 44 GB at 240×240 with their labels, against about 80 GB in float32,
  at the 122.5 slices per case that four BRATS 2015 cases kept; chapter 7 computes it; its
  1e-3 resolution in [0, 1] is below the noise);
- ``cases/<id>.seg.npy``: uint8 ``(n, S, S)`` canonical labels.

``manifest.json`` records the case ids, the kept slice indices, the patient-level
train/val/test split (seeded, so every method sees the same patients), the settings and the
SHA-1 of every source file. Re-running with the same inputs and settings does nothing; a case
whose files changed is rebuilt; changed settings rebuild everything.

Down-sampling rule: images are averaged over ``f×f`` blocks; labels take the most frequent
label of each block (ties go to the higher label, so thin ET rims survive). Explained in
chapter 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.config import DataConfig
from fuse4seg.data.find import SCHEME_OF_LAYOUT
from fuse4seg.data.labels import EXPORT, NUM_CLASSES
from fuse4seg.data.layouts import DataError, find_cases, load_case
from fuse4seg.utils import atomic_write_json, case_map, file_mode

__all__ = [
    "CACHE_VERSION",
    "SliceDataset",
    "cache_settings",
    "load_manifest",
    "make_split",
    "prepare_cache",
    "preprocess_labels",
    "preprocess_volume",
    "restore_volume",
    "training_scheme",
]

CACHE_VERSION = 1
SETTINGS_FIELDS = (
    "downsample",
    "crop_size",
    "min_brain_fraction",
    "slice_stride",
    "max_cases",
    "intensity_percentiles",
    "split_fractions",
    "split_seed",
)


# ---------------------------------------------------------------------------------------------
# Geometry: down-sample, crop/pad, and back


def _pad_to_multiple(volume: np.ndarray, f: int) -> np.ndarray:
    x, y = volume.shape[:2]
    px, py = (-x) % f, (-y) % f
    if px or py:
        volume = np.pad(volume, [(0, px), (0, py)] + [(0, 0)] * (volume.ndim - 2))
    return volume


def _centre(slices: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Centre crop and/or zero pad ``(Z, H, W)`` to ``(Z, *shape_hw)``.

    The same rule serves both ways: ``_centre(x, (S, S))`` crops/pads a slice to the training
    size and ``_centre(y, (H, W))`` puts it back (zeros where it was cropped away).
    """
    out = np.zeros((slices.shape[0],) + tuple(shape_hw), dtype=slices.dtype)
    src, dst = [], []
    for n_src, n_dst in zip(slices.shape[1:], shape_hw, strict=True):
        if n_src >= n_dst:
            start = (n_src - n_dst) // 2
            src.append(slice(start, start + n_dst))
            dst.append(slice(0, n_dst))
        else:
            start = (n_dst - n_src) // 2
            src.append(slice(0, n_src))
            dst.append(slice(start, start + n_src))
    out[:, dst[0], dst[1]] = slices[:, src[0], src[1]]
    return out


def outside_crop(mask: np.ndarray, data_cfg: DataConfig) -> float:
    """Fraction of the voxels of ``mask`` (bool ``(X, Y, Z)``) that the in-plane centre crop of
    :func:`preprocess_volume` cuts away (0.0 when the crop holds them all, or ``mask`` is empty).

    :func:`prepare_cache` records it per case for the brain and the tumour and warns when the
    crop cuts into either: what is cut away is never seen in training and is predicted as
    background at inference."""
    f = data_cfg.downsample
    counts = _pad_to_multiple(np.count_nonzero(mask, axis=2), f)  # (X, Y) voxels per column
    x, y = counts.shape
    counts = counts.reshape(x // f, f, y // f, f).sum(axis=(1, 3))
    total = int(counts.sum())
    if total == 0:
        return 0.0
    kept = int(_centre(counts[None], (data_cfg.crop_size,) * 2).sum())
    return (total - kept) / total


MIN_SIDE = 16
"""The fewest pixels a side :func:`preprocess_volume` leaves of a slice after down-sampling."""


def preprocess_volume(volume: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """``(X, Y, Z)`` image in [0, 1] → ``(Z, S, S)`` float32 slices (block mean, crop/pad).

    Raises:
        DataError: ``data.downsample`` leaves fewer than ``MIN_SIDE`` pixels a side (the
            slices would be almost all padding, with no tumour left to learn or segment).
    """
    f = data_cfg.downsample
    if -(-min(volume.shape[:2]) // f) < MIN_SIDE:
        x, y = volume.shape[:2]
        raise DataError(f"data.downsample={f} leaves {-(-x // f)}x{-(-y // f)} pixels of a {x}x{y} "
                        f"slice, fewer than {MIN_SIDE} a side: lower data.downsample")
    v = _pad_to_multiple(np.asarray(volume, dtype=np.float32), f)
    x, y, z = v.shape
    v = v.reshape(x // f, f, y // f, f, z).mean(axis=(1, 3))  # (X/f, Y/f, Z)
    return _centre(np.ascontiguousarray(v.transpose(2, 0, 1)), (data_cfg.crop_size,) * 2)


def preprocess_labels(seg: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """``(X, Y, Z)`` canonical labels → ``(Z, S, S)`` uint8 (block mode, ties to higher)."""
    f = data_cfg.downsample
    s = _pad_to_multiple(np.asarray(seg, dtype=np.uint8), f)
    x, y, z = s.shape
    if f > 1:
        blocks = s.reshape(x // f, f, y // f, f, z)
        counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(NUM_CLASSES)])
        # argmax over the reversed class axis breaks ties towards the higher label
        s = (NUM_CLASSES - 1 - np.argmax(counts[::-1], axis=0)).astype(np.uint8)
    return _centre(np.ascontiguousarray(s.transpose(2, 0, 1)), (data_cfg.crop_size,) * 2)


def restore_volume(
    slices: np.ndarray, shape: tuple[int, int, int], data_cfg: DataConfig, labels: bool
) -> np.ndarray:
    """Undo :func:`preprocess_volume` / :func:`preprocess_labels`: ``(Z, S, S)`` → ``(X, Y, Z)``.

    Labels are up-sampled by repetition (nearest neighbour), images bilinearly; voxels outside
    the crop are 0.
    """
    f = data_cfg.downsample
    x, y, z = shape
    if slices.shape[0] != z:
        raise ValueError(f"restore_volume: {slices.shape[0]} slices for a volume with {z}")
    small_hw = (-(-x // f), -(-y // f))
    small = _centre(np.asarray(slices), small_hw)  # (Z, X/f, Y/f)
    if f > 1:
        if labels:
            small = small.repeat(f, axis=1).repeat(f, axis=2)
        else:
            from scipy.ndimage import zoom

            small = zoom(small.astype(np.float32), (1, f, f), order=1, grid_mode=True,
                         mode="nearest")
    return np.ascontiguousarray(small[:, :x, :y].transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------
# The split and the manifest


def make_split(case_ids: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """A seeded patient-level train/val/test split.

    With 3 or more cases, validation and test get at least one case each (when their fraction
    is > 0); 2 cases give one train and one validation case; 1 case is train only.
    """
    ids = sorted(case_ids)
    n = len(ids)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    f_train, f_val, f_test = fractions
    if n >= 3:
        n_val = max(1, round(f_val * n)) if f_val > 0 else 0
        n_test = max(1, round(f_test * n)) if f_test > 0 else 0
        n_val = min(n_val, n - 1 - n_test)
    elif n == 2:
        n_val, n_test = (1 if f_val > 0 else 0), 0
    else:
        n_val = n_test = 0
    n_train = n - n_val - n_test
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def cache_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The data settings a cache's manifest records (``settings``), as JSON reads them back:
    what :func:`prepare_cache` and :func:`fuse4seg.train.runs.resolve_cache` compare."""
    values = {name: getattr(data_cfg, name) for name in SETTINGS_FIELDS}
    return json.loads(json.dumps(values))


def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared cache.

    Raises:
        DataError: the folder is not a prepared cache.
    """
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        raise DataError(
            f"{cache_dir}: not a prepared slice cache (no manifest.json); "
            f"run `fuse4seg data prepare DATA_DIR --out {cache_dir}`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt manifest ({exc})") from exc


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.chmod(tmp, file_mode())  # as the manifest: readable by whoever shares the cache
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_cache(
    data_dir: str | Path,
    cache_dir: str | Path,
    data_cfg: DataConfig,
    layout: str | None = None,
    progress: bool = True,
    workers: int = 1,
    patterns: dict[str, str] | None = None,
    skip_bad: bool = False,
    flag: str = "--out",
) -> Path:
    """Build (or bring up to date) the slice cache of ``data_dir`` in ``cache_dir``.

    Each source file is read once: its SHA-1 and its voxels come from the same bytes. With
    ``workers > 1`` the cases are built by that many processes; the manifest and every array
    are byte-identical to those of one worker (each case is built by the same function and the
    manifest lists the cases in the same order).

    A bad case stops the preparation, naming it, unless ``skip_bad``: then every bad case is
    left out, with its error, in the manifest's ``skipped`` list (and a warning). A stopped
    preparation leaves no cache behind: a folder it created is removed (in an existing empty
    folder, the ``cases/`` it began), and an earlier cache in ``cache_dir`` loses its
    manifest (some of its arrays may have been rewritten), so it is prepared again next time
    rather than read half old, half new. An existing ``cache_dir`` that holds other files is
    refused before anything is written.

    Returns:
        The path of ``manifest.json``.

    Raises:
        DataError: no cases, a bad case (named), a case with no slice left, ``cache_dir``
            that is ``data_dir`` itself (its manifest would make the data look like a cache),
            or an existing ``cache_dir`` that is not a cache (``_check_cache_folder``).

    Explained in chapter 1.
    """
    if int(workers) < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    if cache_dir.resolve() == data_dir.resolve():
        raise DataError(f"{flag} {cache_dir}: is the data folder itself; write the cache to "
                        "another folder")
    cases = find_cases(data_dir, layout, patterns)
    if data_cfg.max_cases is not None:
        cases = cases[: data_cfg.max_cases]
    created = not cache_dir.exists()
    if not created:
        _check_cache_folder(cache_dir, flag)
    had_cases = (cache_dir / "cases").exists()
    try:
        return _prepare(data_dir, cache_dir, cases, data_cfg, progress, workers, skip_bad)
    except BaseException as err:
        if created:
            shutil.rmtree(cache_dir, ignore_errors=True)
        else:
            (cache_dir / "manifest.json").unlink(missing_ok=True)
            if not had_cases:  # the arrays this call began to write, in a folder it did not make
                shutil.rmtree(cache_dir / "cases", ignore_errors=True)
        if isinstance(err, DataError) and not skip_bad:
            options = _case_options(data_dir, layout, patterns)
            check = " ".join(["fuse4seg data check", *options])
            out = shlex.quote(str(cache_dir))
            skip = " ".join(["fuse4seg data prepare", *options, "--out", out, "--skip-bad"])
            # from train or study (--cache, or the runs folder's own cache): the raw --data
            # would be prepared again, and stop again, so they must train on the cache
            then = "" if flag == "--out" else f", and `--data {out}` then trains on them"
            raise DataError(f"{err} (`{check}` lists every bad case; `{skip}`, with the same "
                            f"--profile and --set, prepares the others{then})") from err
        raise


def _case_options(data_dir: Path, layout: str | None, patterns: dict[str, str] | None
                  ) -> list[str]:
    """``data_dir`` and the ``--layout`` / ``--*-pattern`` options that found its cases, shell
    quoted: the same cases for the ``data check`` and ``data prepare --skip-bad`` that a
    failed preparation suggests."""
    words = [shlex.quote(str(data_dir))]
    if layout:
        words += ["--layout", shlex.quote(layout)]
    for key, glob in (patterns or {}).items():
        if glob:
            words += [f"--{key.replace('_', '-')}-pattern", shlex.quote(glob)]
    return words


def _check_cache_folder(cache_dir: Path, flag: str = "--out") -> None:
    """Refuse an existing ``cache_dir`` that is not a slice cache (nor the remains of one);
    messages name it as ``flag`` (``--out`` of ``data prepare``, ``--cache`` of ``train``).

    Preparing writes ``manifest.json`` and ``cases/`` there, and a stopped preparation removes
    the manifest; in a folder of the user's own files that would overwrite or delete their
    ``manifest.json``. Allowed: an empty folder, a cache (its ``manifest.json`` is one of
    ours), and the ``cases/`` a stopped preparation left without its manifest.

    Raises:
        DataError: ``cache_dir`` is a file, holds a ``manifest.json`` that is not a cache's,
            or holds other files and no manifest.
    """
    if not cache_dir.is_dir():
        raise DataError(f"{flag} {cache_dir}: exists and is not a folder")
    manifest = cache_dir / "manifest.json"
    if manifest.exists():
        try:
            content = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            content = None
        if not (isinstance(content, dict) and "version" in content and "settings" in content):
            raise DataError(
                f"{flag} {cache_dir}: its manifest.json is not a fuse4seg slice cache's; "
                "prepare into a new or empty folder"
            )
        return
    others = sorted(p.name for p in cache_dir.iterdir()
                    if p.name != "cases" and not p.name.startswith(".manifest.json."))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(
            f"{flag} {cache_dir}: holds files that are not a slice cache ({shown}); prepare "
            "into a new or empty folder"
        )


def _prepare(data_dir: Path, cache_dir: Path, cases: list, data_cfg: DataConfig,
             progress: bool, workers: int, skip_bad: bool) -> Path:
    """:func:`prepare_cache`'s work once the cases are found."""
    (cache_dir / "cases").mkdir(parents=True, exist_ok=True)
    settings = cache_settings(data_cfg)
    old: dict[str, Any] = {}
    if (cache_dir / "manifest.json").exists():
        try:
            old = load_manifest(cache_dir)
        except DataError:
            old = {}
    same_settings = old.get("settings") == settings and old.get("version") == CACHE_VERSION
    old_cases = {c["case_id"]: c for c in old.get("case_info", [])} if same_settings else {}

    jobs = [(files, data_cfg, str(cache_dir), old_cases.get(files.case_id)) for files in cases]
    info, rebuilt, skipped = [], 0, []
    job = _case_job_or_error if skip_bad else _case_job
    with case_map(job, jobs, workers, progress, "preparing slices") as results:
        for entry, built in results:
            if "error" in entry:
                skipped.append(entry)
                continue
            info.append(entry)
            rebuilt += built
    if skipped:
        import warnings

        warnings.warn(
            f"--skip-bad: left out {len(skipped)} bad case(s): "
            + "; ".join(f"{e['case_id']}: " + e["error"].removeprefix(f"case {e['case_id']}: ")
                        for e in skipped[:5])  # the case named once
            + (f"; and {len(skipped) - 5} more (the manifest's 'skipped')"
               if len(skipped) > 5 else ""),
            stacklevel=3,
        )
    if not info:
        raise DataError(f"{data_dir}: every case is bad ({len(skipped)} skipped)")

    _warn_if_cropped(info, data_cfg)
    _warn_if_padded(info, data_cfg)
    case_ids = [c["case_id"] for c in info]
    split = make_split(case_ids, data_cfg.split_fractions, data_cfg.split_seed)
    manifest = {
        "version": CACHE_VERSION,
        "data_dir": str(data_dir.resolve()),
        "settings": settings,
        "cases": case_ids,
        "split": split,
        "num_slices": int(sum(c["num_slices"] for c in info)),
        "case_info": info,
    }
    if skipped:
        manifest["skipped"] = skipped
    unchanged = (rebuilt == 0 and old.get("cases") == case_ids and old.get("split") == split
                 and old.get("skipped") == manifest.get("skipped"))
    path = cache_dir / "manifest.json"
    if not unchanged:
        atomic_write_json(path, manifest)
    return path


CROP_WARN_FRACTION = 1e-3
"""Brain fraction cut away by the crop above which :func:`prepare_cache` warns (any tumour
voxel cut away always warns)."""


_CROP_WARNED: set[tuple] = set()
"""What :func:`_warn_if_cropped` has said in this process (a chapter resolves its cache several
times; once is enough)."""


def crop_setting(data_cfg: DataConfig) -> str:
    """``data.crop_size=C after Nx down-sampling``: how the crop warnings of ``data prepare``
    and ``predict`` name the setting that cuts brain away."""
    return f"data.crop_size={data_cfg.crop_size} after {data_cfg.downsample}x down-sampling"


def _warn_if_cropped(info: list[dict[str, Any]], data_cfg: DataConfig) -> None:
    """Warn, naming the cases, when ``data.crop_size`` cuts brain or tumour away (once per
    process for the same cases and settings)."""
    import warnings

    cut = [c for c in info if c.get("brain_outside_crop", 0.0) > CROP_WARN_FRACTION
           or c.get("tumour_outside_crop", 0.0) > 0.0]
    said = (data_cfg.crop_size, data_cfg.downsample,
            tuple((c["case_id"], c["brain_outside_crop"], c["tumour_outside_crop"]) for c in cut))
    if not cut or said in _CROP_WARNED:
        return
    _CROP_WARNED.add(said)
    shown = ", ".join(
        f"{c['case_id']} (brain {c['brain_outside_crop']:.1%}, tumour "
        f"{c['tumour_outside_crop']:.1%})" for c in cut[:5]
    )
    more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
    warnings.warn(
        f"{crop_setting(data_cfg)} cuts "
        f"brain or tumour voxels away in {len(cut)} case(s): {shown}{more}. They are never "
        f"trained on and are predicted as background; raise data.crop_size (a multiple of 16).",
        stacklevel=3,
    )


def _warn_if_padded(info: list[dict[str, Any]], data_cfg: DataConfig) -> None:
    """Warn when ``data.crop_size`` holds more than twice the pixels every case's down-sampled
    slice needs (its largest side rounded up to a multiple of 16): every slice is then mostly
    zero padding, which costs memory and training time and teaches nothing."""
    import warnings

    f = data_cfg.downsample
    sides = [-(-max(c["shape"][:2]) // f) for c in info if c.get("shape")]
    if not sides:
        return
    need = -(-max(sides) // 16) * 16
    said = ("padded", data_cfg.crop_size, f, max(sides))  # once per process, as the crop's
    # (more than twice the pixels: the paper's 240 on 182x218 MNI-space cases is not worth it)
    if data_cfg.crop_size ** 2 > 2 * need ** 2 and said not in _CROP_WARNED:
        _CROP_WARNED.add(said)
        warnings.warn(
            f"{crop_setting(data_cfg)} pads every case's slices (at most {max(sides)} pixels "
            f"a side) with zeros to {data_cfg.crop_size}x{data_cfg.crop_size}: "
            f"{(data_cfg.crop_size / max(sides)) ** 2:.1f}x the pixels, the extra ones all "
            f"background; data.crop_size={need} holds them all", stacklevel=3)


def _case_job_or_error(job) -> tuple[dict[str, Any], bool]:
    """:func:`_case_job`, with a bad case returned as ``({"case_id", "error"}, False)``."""
    try:
        return _case_job(job)
    except DataError as err:
        return {"case_id": job[0].case_id, "error": str(err)}, False


def _case_job(job) -> tuple[dict[str, Any], bool]:
    """One case of :func:`prepare_cache`: ``(manifest entry, rebuilt?)``. The previous entry
    is kept when the SHA-1s of the sources and the arrays are unchanged; otherwise the case
    is built from the bytes just hashed (each file is read once)."""
    files, data_cfg, cache_dir, prev = job
    sources = {k: str(p) for k, p in files.paths.items() if p is not None}
    hashed = sorted(k for k in sources if k != "flair" or files.layout != "msd")
    raw: dict[str, bytes] = {}
    checksums: dict[str, str] = {}
    for key in hashed:
        path = Path(sources[key])
        if not path.exists():
            raise DataError(f"{path}: file does not exist (case {files.case_id})")
        raw[key] = path.read_bytes()
        checksums[key] = hashlib.sha1(raw[key]).hexdigest()
    stem = Path(cache_dir) / "cases" / files.case_id
    arrays = [Path(f"{stem}.{m}.npy") for m in ("t1ce", "flair", "seg")]
    if prev is not None and prev["checksums"] == checksums and all(a.exists() for a in arrays):
        return prev, False
    entry = _prepare_case(files, data_cfg, stem, raw)
    entry["checksums"] = checksums
    entry["sources"] = sources
    return entry, True


def _prepare_case(files, data_cfg: DataConfig, stem: Path, raw=None) -> dict[str, Any]:
    case = load_case(files, raw=raw)
    x, y, _ = case.shape
    fraction = np.count_nonzero(case.brain_mask, axis=(0, 1)) / (x * y)
    keep = np.flatnonzero(fraction >= data_cfg.min_brain_fraction)[:: data_cfg.slice_stride]
    if keep.size == 0:
        raise DataError(
            f"case {case.case_id}: no axial slice has at least "
            f"{data_cfg.min_brain_fraction:.0%} brain"
        )
    if data_cfg.downsample == 1:  # slices written straight from the brain voxels
        size = (data_cfg.crop_size,) * 2
        volumes = case.normalized_slices(data_cfg.intensity_percentiles, keep, np.float16)
        arrays = [v if v.shape[1:] == size else _centre(v, size) for v in volumes]
    else:
        volumes = case.normalized(data_cfg.intensity_percentiles, slices=keep)
        arrays = [preprocess_volume(v, data_cfg).astype(np.float16) for v in volumes]
    for name, array in zip(("t1ce", "flair"), arrays, strict=True):
        _save_npy(Path(f"{stem}.{name}.npy"), array)
    if data_cfg.downsample == 1:  # preprocess_labels without its intermediate copies
        labels = _centre(case.seg[:, :, keep].transpose(2, 0, 1), (data_cfg.crop_size,) * 2)
    else:
        labels = preprocess_labels(case.seg[:, :, keep], data_cfg)
    _save_npy(Path(f"{stem}.seg.npy"), labels)
    return {
        "case_id": case.case_id,
        "layout": case.layout,
        "scheme": case.scheme,  # the label scheme read (a named case's, from its values)
        "shape": list(case.shape),
        "slices": [int(k) for k in keep],
        "num_slices": int(keep.size),
        "brain_outside_crop": outside_crop(case.brain_mask, data_cfg),
        "tumour_outside_crop": outside_crop(case.seg > 0, data_cfg),
    }


def training_scheme(manifest: dict[str, Any], case_ids) -> str | None:
    """The label scheme of the cases ``case_ids`` of a cache's ``manifest``: the most common
    among them, ties going to the scheme of the first case by name. Each case counts by the
    ``scheme`` its entry records (what :func:`~fuse4seg.data.layouts.load_case` read: a
    ``named`` case's from its label values); an entry written before the cache recorded it
    counts by its layout's scheme, and a ``named`` one by none. ``None`` where no case says
    (``predict`` then asks for ``--scheme`` rather than guess)."""
    info = {c["case_id"]: c for c in manifest.get("case_info", [])}
    counts: dict[str, int] = {}
    for cid in sorted(case_ids):
        entry = info.get(cid, {})
        scheme = entry.get("scheme") or SCHEME_OF_LAYOUT.get(entry.get("layout", ""))
        if scheme in EXPORT:
            counts[scheme] = counts.get(scheme, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


# ---------------------------------------------------------------------------------------------
# Reading the cache


class SliceDataset:
    """Slices of one split of a prepared cache, as a ``torch.utils.data.Dataset``.

    Item ``i`` is ``{"x1": (1, S, S) float32 T1ce, "x2": (1, S, S) float32 FLAIR, "seg": (S, S)
    int64 canonical labels, "case_id": str, "case_index": int, "slice_index": int}``.
    ``case_index`` indexes ``case_ids``; ``slice_case`` holds it for every item, which is
    what the patient-level batch split of Algorithm 1 needs.

    Args:
        cache_dir: a folder made by :func:`prepare_cache`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        cases: use exactly these case ids instead of a split.
    """

    def __init__(self, cache_dir: str | Path, split: str = "train", cases=None):
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(self.cache_dir)
        if cases is None:
            if split == "all":
                cases = self.manifest["cases"]
            elif split in self.manifest["split"]:
                cases = self.manifest["split"][split]
            else:
                raise ValueError(f"unknown split {split!r}; use train, val, test or all")
        info = {c["case_id"]: c for c in self.manifest["case_info"]}
        missing = [c for c in cases if c not in info]
        if missing:
            raise DataError(f"{self.cache_dir}: cases not in the cache: {missing}")
        self.split = split
        self.case_ids: list[str] = list(cases)
        self.case_slices = [info[c]["slices"] for c in self.case_ids]
        counts = [len(s) for s in self.case_slices]
        self.slice_case = np.repeat(np.arange(len(counts)), counts)
        self._row = np.concatenate([np.arange(n) for n in counts]) if counts else np.zeros(0, int)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.slice_case.size)

    def slices_of(self, case_index: int) -> np.ndarray:
        """Item indices of one patient."""
        return np.flatnonzero(self.slice_case == case_index)

    def _open(self, case_index: int):
        if case_index not in self._arrays:
            stem = self.cache_dir / "cases" / self.case_ids[case_index]
            self._arrays[case_index] = tuple(
                np.load(f"{stem}.{m}.npy", mmap_mode="r") for m in ("t1ce", "flair", "seg")
            )
        return self._arrays[case_index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        case_index = int(self.slice_case[index])
        row = int(self._row[index])
        t1ce, flair, seg = self._open(case_index)
        return {
            "x1": torch.from_numpy(np.asarray(t1ce[row], dtype=np.float32))[None],
            "x2": torch.from_numpy(np.asarray(flair[row], dtype=np.float32))[None],
            "seg": torch.from_numpy(np.asarray(seg[row], dtype=np.int64)),
            "case_id": self.case_ids[case_index],
            "case_index": case_index,
            "slice_index": int(self.case_slices[case_index][row]),
        }

    def __getstate__(self):  # memory maps are reopened in worker processes
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state
