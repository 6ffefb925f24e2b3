"""Use a trained run: segment whole volumes (``predict``) and score a split (``evaluate``).

Both read an *inference bundle* (``checkpoints/best.pt``, else ``ema.pt``): the EMA leader
θ̂_f (Eq. 4) and the follower. A volume goes through the same steps as the training slices —
per-volume robust scaling to [0, 1] inside the brain, in-plane down-sampling and centre crop
(:mod:`fuse4seg.data.slices`) — is fused and segmented slice by slice in batches, and is put back
on the input grid (:func:`fuse4seg.data.slices.restore_volume`). Labels outside the brain are
set to background. Scores are 3-D Dice/IoU per case at the input's resolution, over **all** axial
slices (not only the slices kept for training), so they are comparable with BraTS numbers.

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fuse4seg.config import Config, config_from_dict
from fuse4seg.fusion_baselines import RULES
from fuse4seg.metrics.segmentation import tumour_mean
from fuse4seg.models import build_leader, place_leader
from fuse4seg.train.checkpoint import load_checkpoint
from fuse4seg.train.methods import build_follower, get_method
from fuse4seg.utils import (
    atomic_replace_files,
    atomic_write_bytes,
    atomic_write_json,
    check_not_an_input,
    missing_folders,
    probe_writable,
    remove_empty_folders,
    run_folder_of,
)

__all__ = [
    "Bundle",
    "evaluate_run",
    "load_bundle",
    "predict_files",
    "predict_volume",
    "segment_slices",
    "volume_slices",
]

@dataclass
class Bundle:
    """A trained model ready for inference."""

    method: str
    config: Config
    leader: nn.Module | None  # EMA weights, eval mode
    follower: nn.Module  # eval mode
    scheme: str | None  # label scheme of the training data (None: not recorded)
    epoch: int
    path: Path
    device: torch.device


def default_batch_size(device: torch.device | str) -> int:
    """Slices per forward pass when none is given: 4 on a CPU, 16 on a GPU.

    On a CPU small batches are faster per slice: at 80×80 slices (the ``default`` profile before
    its 64×64 crop) a batch of 4 pushes slices through leader and follower 1.7× faster than a
    batch of 16, whose activations no longer fit the caches (``benchmarks/bench_inference.py``,
    ``benchmarks/RESULTS.md``). The results do not depend on it beyond float noise.
    """
    return 4 if torch.device(device).type == "cpu" else 16


def _checkpoint_path(checkpoint: str | Path, which: str | None = None) -> Path:
    """The checkpoint file of a run folder (``which``: ``best``, the default, falling back to
    ``ema``; ``ema``; ``last``) or ``checkpoint`` itself when it is a file.

    Raises:
        FileNotFoundError: no such folder or file, or no such checkpoint in the folder.
        ValueError: an unknown ``which``, or a ``which`` given with a checkpoint file (it
            chooses a file inside a run folder; silently ignoring it would score another
            checkpoint than the one asked for), or a fusion-only run folder (no follower).
    """
    path = Path(checkpoint)
    order = {"best": ["best.pt", "ema.pt"], "ema": ["ema.pt"], "last": ["last.pt"]}
    if which is not None and which not in order:
        raise ValueError(f"--which {which!r}: choose best, ema or last")
    if path.is_file():
        if which is not None:
            raise ValueError(f"--which {which}: {path} is a checkpoint file; --which chooses "
                             "one inside a run folder")
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    folder = path / "checkpoints"
    which = which or "best"
    for name in order[which]:
        if (folder / name).is_file():
            return folder / name
    if (folder / "leader.pt").is_file():  # what `fuse4seg fusion train` writes
        raise ValueError(f"{path}: a fusion-only run (checkpoints/leader.pt): it has no "
                         "segmentation follower; score its leader with `fuse4seg fusion "
                         "evaluate`")
    raise FileNotFoundError(
        f"{path}: no {' or '.join(order[which])} under {folder} (not a run folder?)"
    )


def load_bundle(checkpoint: str | Path, which: str | None = None,
                device: str = "auto") -> Bundle:
    """Load the EMA leader and follower of a run folder or a checkpoint file.

    Args:
        checkpoint: a run folder (``best.pt``, falling back to ``ema.pt``) or a ``.pt`` file
            (a bundle, or a training state ``last.pt``, whose EMA leader is used, and its
            follower's weight average where ``train.follower_ema`` kept one).
        which: ``"best"`` (the default), ``"ema"`` or ``"last"`` when ``checkpoint`` is a
            folder; must be ``None`` for a file.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Raises:
        FileNotFoundError, ValueError: missing or unreadable checkpoint.
    """
    from fuse4seg.utils import resolve_device

    path = _checkpoint_path(checkpoint, which)
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location="cpu")
    if state.get("kind") == "fusion_leader":
        raise ValueError(
            f"{path}: a fusion-only leader (`fuse4seg fusion train`) has no segmentation "
            "network; give a run folder of `fuse4seg train` (`fuse4seg fusion evaluate` "
            "uses this one)"
        )
    if "method" not in state or "config" not in state:
        raise ValueError(f"{path}: not a fuse4seg training checkpoint (no method or config)")
    method = state["method"]
    # a checkpoint that does not fit this fuse4seg (another version's, an edited or foreign
    # one) is refused with its path, whatever part of it does not fit
    try:
        spec = get_method(method)
        config = config_from_dict(state["config"])
        if state.get("kind") == "training":  # last.pt: the engine's state
            if "engine" not in state:
                raise ValueError("a training state of an older fuse4seg; use best.pt")
            engine = state["engine"]
            # the EMA leader, and the follower's weight average where train.follower_ema
            # kept one
            leader_weights = engine["ema"]
            follower_weights = engine.get("follower_ema") or engine["follower"]
        else:
            leader_weights, follower_weights = state["leader"], state["follower"]
        leader = None
        if spec.leader:
            leader = build_leader(config)
            leader.load_state_dict(leader_weights)
        follower = build_follower(config, method)
        follower.load_state_dict(follower_weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        what = what.replace("--method ", "method ")  # a stored method, not a flag
        raise ValueError(f"{path}: a checkpoint this fuse4seg cannot load ({what})") from exc
    if leader is not None:
        leader = place_leader(leader, dev).eval()  # channels-last on a CPU, as in training
    follower = follower.to(dev).eval()
    scheme = state.get("scheme", "brats2021")
    # last.pt holds the epoch to run next; a bundle, the one it finished
    epoch = max(int(state.get("epoch", 0)) - (state.get("kind") == "training"), 0)
    return Bundle(method, config, leader, follower, scheme, epoch, path, dev)


@torch.no_grad()
def segment_slices(
    bundle: Bundle, x1: np.ndarray, x2: np.ndarray, batch_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Fuse and segment ``(N, S, S)`` slices in [0, 1], ``batch_size`` at a time (``None``:
    4 on a CPU, 16 on a GPU, by the bundle's device); ``progress`` shows a bar over the
    batches.

    Returns:
        ``(fused (N, S, S) float32 or None, labels (N, S, S) uint8 canonical)``; ``fused`` is
        ``None`` for the 2-channel methods, which have no single fused image.
    """
    batch_size = batch_size or default_batch_size(bundle.device)
    fused_out, labels_out = [], []
    spec = get_method(bundle.method)
    single = spec.in_channels == 1
    starts = range(0, x1.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="slices", unit="batch", leave=False)
    for start in starts:
        # copies: the slices may be read-only arrays kept between calls (_scored_case)
        a = torch.from_numpy(np.array(x1[start : start + batch_size], np.float32))
        b = torch.from_numpy(np.array(x2[start : start + batch_size], np.float32))
        a, b = a[:, None].to(bundle.device), b[:, None].to(bundle.device)  # (B, 1, S, S)
        if bundle.leader is not None:
            x_in, _ = bundle.leader(a, b)  # (B, 1, S, S) x2 -> (B, 1, S, S)
        else:
            x_in = RULES[spec.rule](a, b)
        logits = bundle.follower(x_in.float())  # (B, C, S, S) -> (B, 4, S, S)
        labels_out.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
        if single:
            fused_out.append(x_in[:, 0].float().cpu().numpy())
    labels = np.concatenate(labels_out)
    return (np.concatenate(fused_out) if single else None), labels


def volume_slices(t1ce: np.ndarray, flair: np.ndarray, brain_mask: np.ndarray,
                  data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """The networks' input of a whole volume: T1ce and FLAIR scaled to [0, 1] inside the
    brain, down-sampled and cropped as the training slices, ``2 × (Z, S, S)`` float32."""
    from fuse4seg.data.layouts import normalize_intensity
    from fuse4seg.data.slices import preprocess_volume

    pct = data_cfg.intensity_percentiles
    return (preprocess_volume(normalize_intensity(t1ce, brain_mask, pct), data_cfg),
            preprocess_volume(normalize_intensity(flair, brain_mask, pct), data_cfg))


def predict_volume(
    bundle: Bundle,
    t1ce: np.ndarray | None,
    flair: np.ndarray | None,
    brain_mask: np.ndarray,
    batch_size: int | None = None,
    fused: bool = True,
    slices: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Fuse and segment a whole volume, slice by slice.

    Args:
        t1ce, flair: raw intensities ``(X, Y, Z)`` on the same grid (unused with ``slices``).
        brain_mask: bool ``(X, Y, Z)``.
        fused: also put x_f back on the input grid (``False``: return ``None`` for it, as
            scoring needs only the labels).
        slices: :func:`volume_slices` of this volume with the bundle's data settings, when the
            caller has them already.
        progress: a bar over the batches of slices (:func:`segment_slices`).

    Returns:
        ``(fused (X, Y, Z) float32 in [0, 1] or None, seg (X, Y, Z) uint8 canonical labels)``.
    """
    from fuse4seg.data.slices import restore_volume

    cfg = bundle.config.data
    shape = tuple(int(s) for s in brain_mask.shape)
    s1, s2 = slices if slices is not None else volume_slices(t1ce, flair, brain_mask, cfg)
    x_f, labels = segment_slices(bundle, s1, s2, batch_size, progress)  # (Z, S, S)
    seg = restore_volume(labels, shape, cfg, labels=True).astype(np.uint8)
    seg[~brain_mask] = 0
    if x_f is None or not fused:
        return None, seg
    return np.clip(restore_volume(x_f, shape, cfg, labels=False), 0.0, 1.0).astype(np.float32), seg


_SCORED: dict[tuple, tuple] = {}
"""The test volumes :func:`evaluate_run` read last: ``key -> (slices, brain mask, labels)``."""

SCORED_CACHE_BYTES = 512 << 20
"""Most bytes :func:`evaluate_run` keeps of prepared test volumes between calls."""


def _scored_case(entry: dict[str, Any], data_cfg) -> tuple:
    """A test case as scoring needs it: ``((s1, s2), brain_mask, seg)``, kept between calls.

    Scoring several runs of one split (chapter 06 scores up to nine) reads, scales and
    down-samples the same volumes each time; the result depends only on the source files
    (their paths, sizes and modification times are in the key) and the data settings, so it is
    kept, up to :data:`SCORED_CACHE_BYTES`, the oldest dropped first. The networks' outputs are
    exactly those of a fresh read (tested).
    """
    import os

    from fuse4seg.data.layouts import CaseFiles, load_case

    paths = {k: Path(v) for k, v in entry["sources"].items()}
    try:
        stats = tuple(sorted((k, str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                             for k, p in paths.items()))
    except OSError:  # a missing file: load_case raises the DataError that names it
        stats = None
    key = (entry["case_id"], entry["layout"], stats, data_cfg.downsample, data_cfg.crop_size,
           tuple(data_cfg.intensity_percentiles))
    if stats is not None and key in _SCORED:
        return _SCORED[key]
    case = load_case(CaseFiles(entry["case_id"], entry["layout"], paths))
    item = (volume_slices(case.t1ce, case.flair, case.brain_mask, data_cfg), case.brain_mask,
            case.seg)
    for array in (*item[0], item[1], item[2]):
        array.setflags(write=False)  # shared by later calls: nobody may change them
    size = _nbytes(item)
    if stats is None or size > SCORED_CACHE_BYTES:
        return item
    kept = sum(_nbytes(v) for v in _SCORED.values())
    while _SCORED and kept + size > SCORED_CACHE_BYTES:  # drop the oldest first
        kept -= _nbytes(_SCORED.pop(next(iter(_SCORED))))
    _SCORED[key] = item
    return item


def _nbytes(item: tuple) -> int:
    """Bytes of a :func:`_scored_case` entry."""
    return sum(a.nbytes for a in (*item[0], item[1], item[2]))


def _scheme_of(path: Path, default: str, brats2013: bool = False) -> str:
    name = path.name.lower()
    if "_t1ce" in name:
        return "brats2021"
    if "-t1c" in name:
        return "brats2023"
    return "brats2013" if brats2013 else default


def _brats2013_case(t1ce: Path):
    """The :class:`~fuse4seg.data.find.CaseFiles` of ``t1ce``'s folder when it is a BRATS
    2013/2015 case folder (``T1c*``, ``Flair*``, ``brainmask*``), else ``None``."""
    from fuse4seg.data.find import DataError, detect_layout, find_cases

    folder = t1ce.parent
    try:
        if detect_layout(folder) != "brats2013":
            return None
        (case,) = find_cases(folder)
    except (DataError, OSError, ValueError):
        return None
    found = case.paths["t1ce"]  # None where several files fit
    return case if found is not None and Path(found).resolve() == t1ce.resolve() else None


def _nifti_bytes(path: Path, data: np.ndarray, affine, header) -> bytes:
    """``data`` as the bytes of a NIfTI file named ``path`` (gzip for ``.gz``)."""
    import nibabel as nib

    hdr = header.copy()
    hdr.set_data_dtype(data.dtype)
    # the input's display window and intent describe its own intensities: a viewer that
    # honours cal_max = 2000 would show x_f (in [0, 1]) black, and a label map is no estimate
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    hdr.set_intent("label" if data.dtype.kind in "iu" else "none")
    image = nib.Nifti1Image(data, affine, hdr)
    image.header.set_slope_inter(1.0, 0.0)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6) if path.suffix == ".gz" else raw


def _write_nifti(path: Path, data: np.ndarray, affine, header) -> None:
    atomic_write_bytes(path, _nifti_bytes(path, data, affine, header))


WHOLE_VOLUME_BRAIN = 0.95
"""A default brain mask (non-zero voxels) covering more of the volume than this is refused by
:func:`predict_files`: the background is not zero, so the mask would be the whole volume."""


def _writable_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written there, before any model runs.

    Raises:
        ValueError: the folder cannot be made or written to (the message names ``--out``).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out_dir}: cannot create the folder ({err.strerror})") from err
    probe_writable(out_dir, "--out")


def predict_files(
    checkpoint: str | Path,
    t1ce: str | Path,
    flair: str | Path,
    out_dir: str | Path,
    scheme: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    which: str | None = None,
    mask: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``fuse4seg predict``: write ``fused.nii.gz`` and ``seg.nii.gz`` for one case
    (``seg.nii.gz`` alone for a two-channel method, ``direct2ch`` or ``monai_unet``, which fuses
    nothing; a ``fused.nii.gz`` already in ``out_dir``, another model's, is then removed once
    ``seg.nii.gz`` is written, and the result names it).

    Args:
        checkpoint: a run folder or checkpoint file (:func:`load_bundle`).
        t1ce, flair: NIfTI files on the same grid (skull-stripped: the brain is where either is
            non-zero).
        out_dir: the output folder (created).
        scheme: label scheme of ``seg.nii.gz`` (``brats2021``: ET = 4, ``brats2023``: ET = 3,
            ...); default: guessed from the T1ce file name (``_t1ce`` → brats2021, ``-t1c`` →
            brats2023) or folder (a BRATS 2013/2015 case → brats2013), else the training
            data's scheme (the most common among the run's training cases, which the
            checkpoint records: :func:`fuse4seg.data.slices.training_scheme`).
        mask: a brain-mask NIfTI on the same grid; default: the ``brainmask`` file of a BRATS
            2013/2015 case folder (z-scored volumes, whose background is a constant, not zero),
            else the voxels where T1ce or FLAIR is non-zero (skull-stripped BraTS volumes). A
            default mask that covers the whole volume is refused.
        progress: a bar over the batches of slices.

    The outputs carry the T1ce file's header (grid, orientation, units) with its display
    window (``cal_min``/``cal_max``) cleared and its intent set to ``label`` (``seg``) or
    ``none`` (``fused``), which describe the input's intensities, not these images.

    Returns:
        ``{"fused": path or None, "seg": path, "scheme": str, "label_counts": {...},``
        ``"removed": the earlier fused.nii.gz a 2-channel method removed, or None,``
        ``"mask_found": the brain mask taken from a BRATS 2013/2015 case folder, or None,``
        ``"checkpoint": the checkpoint file used, "epoch": its epoch}``.

    Warns when the run's crop cuts more than ``fuse4seg.data.slices.CROP_WARN_FRACTION``
    of the brain away (a volume at another resolution than the training data's, say).

    Raises:
        FileNotFoundError: a missing file. ValueError: unreadable, non-3-D or non-axial, NaN,
            shape or affine mismatch, empty brain, unknown scheme, an output that would
            replace an input.
    """
    from fuse4seg.data.labels import EXPORT, from_canonical, label_counts
    from fuse4seg.data.layouts import load_volume
    from fuse4seg.data.slices import CROP_WARN_FRACTION, crop_setting, outside_crop

    t1ce, flair, out_dir = Path(t1ce), Path(flair), Path(out_dir)
    for path, flag in ((t1ce, "--t1ce"), (flair, "--flair")):
        if path.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give the NIfTI file")
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if t1ce.resolve() == flair.resolve():
        raise ValueError(f"--t1ce and --flair are the same file ({t1ce}): give the case's "
                         "T1ce and FLAIR volumes")
    for name in ("fused.nii.gz", "seg.nii.gz"):  # an output never replaces an input
        check_not_an_input(out_dir / name, "--out", [("--t1ce", t1ce), ("--flair", flair),
                                                     ("--mask", mask)])
        if (out_dir / name).is_dir():  # refused before the model runs, not after
            raise ValueError(f"--out {out_dir}: {name} is a folder; remove it or choose "
                             "another --out")
    for path, flag in ((t1ce, "--t1ce"), (flair, "--flair")):
        if out_dir.resolve() == path.parent.resolve():
            raise ValueError(f"--out {out_dir}: the folder of {flag} {path.name}; a seg.nii.gz "
                             "there would sit among the case's own files (beside its ground "
                             "truth, in a BraTS case): choose another folder")
    _checkpoint_path(checkpoint, which)  # a wrong checkpoint or --which: before any read
    a, affine, header = load_volume(t1ce, "T1ce")
    b, affine_b, _ = load_volume(flair, "FLAIR")
    for arr, path in ((a, t1ce), (b, flair)):
        if arr.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {t1ce} is {a.shape}, {flair} is {b.shape}")
    if np.array_equal(a, b):
        raise ValueError(f"{t1ce} and {flair} hold the same voxels: give the case's T1ce and "
                         "FLAIR volumes, not one volume twice")
    if not np.allclose(affine, affine_b, atol=1e-3):
        raise ValueError(f"affine mismatch between {t1ce} and {flair}: not on the same grid")
    found_mask, case_2013 = None, _brats2013_case(t1ce)
    if mask is None and case_2013 is not None and case_2013.paths.get("mask"):
        # BRATS 2013/2015 volumes are z-scored (a constant background, not zero) and ship
        # their brain mask: use it, as `fuse4seg data prepare` does for this layout
        mask = found_mask = Path(case_2013.paths["mask"])
    if mask is not None:
        m, affine_m, _ = load_volume(mask, "brain mask")
        if m.shape != a.shape or not np.allclose(affine, affine_m, atol=1e-3):
            raise ValueError(f"--mask {mask}: not on the grid of {t1ce}")
        levels = np.unique(m[m != 0])
        if levels.size > 1:  # 0/1 or 0/255 is a mask; 0/1/2/4 is a label map
            import warnings

            warnings.warn(f"--mask {mask}: {levels.size} non-zero values ("
                          f"{', '.join(f'{v:g}' for v in levels[:5])}), not a binary mask; is it "
                          "a label map? Every voxel above 0.5 is taken as brain", stacklevel=2)
        brain = m > 0.5
    else:
        brain = (a != 0) | (b != 0)
        if brain.mean() > WHOLE_VOLUME_BRAIN:
            raise ValueError(
                f"{t1ce}, {flair}: {100 * brain.mean():.1f} % of the voxels are non-zero, so "
                "the default brain mask (the non-zero voxels) would be the whole volume; the "
                "background is not zero (z-scored volumes such as BRATS 2013/2015): pass "
                "--mask with the case's brain mask"
            )
    if not brain.any():
        which_mask = "--mask" if found_mask is None else "the case's brain mask"
        raise ValueError(f"{which_mask} {mask}: no voxel above 0.5, so an empty brain" if mask
                         else f"{t1ce}, {flair}: empty brain (all zero)")
    for arr, path in ((a, t1ce), (b, flair)):
        inside = arr[brain]
        if inside.min() == inside.max():  # intensity normalisation would divide by zero
            raise ValueError(f"{path}: the same value ({float(inside.min()):g}) in every brain "
                             "voxel: nothing to normalise or segment")
    bundle = load_bundle(checkpoint, which=which, device=device)
    cut = outside_crop(brain, bundle.config.data)
    if cut > CROP_WARN_FRACTION:  # as `data prepare` warns for the training cases
        import warnings

        warnings.warn(
            f"{t1ce}: the run's {crop_setting(bundle.config.data)} "
            f"cuts {cut:.1%} of the brain away (of {a.shape} voxels); it is labelled "
            "background. Is the volume at the resolution of the run's training data?",
            stacklevel=2,
        )
    if scheme is None:
        scheme = _scheme_of(t1ce, bundle.scheme, brats2013=case_2013 is not None)
        if scheme not in EXPORT:  # None, or the first case's layout (an earlier fuse4seg)
            said = ("does not say its training data's label scheme" if scheme is None else
                    f"gives {scheme!r} as its training data's label scheme, which is none")
            raise ValueError(
                f"{bundle.path}: the checkpoint {said}, and the file names do not say; give "
                f"--scheme (one of {', '.join(sorted(EXPORT))})")
    elif scheme not in EXPORT:
        raise ValueError(f"--scheme {scheme!r}: choose one of {sorted(EXPORT)}")
    # the folders this call makes (deepest first): a failed or stopped (Ctrl-C) prediction
    # removes the files it wrote and the folders it left empty, at any point up to the end
    made = missing_folders(out_dir)
    paths = {"fused": out_dir / "fused.nii.gz", "seg": out_dir / "seg.nii.gz"}
    try:
        _writable_folder(out_dir)  # before the model runs: minutes at the paper's size
        fused, seg = predict_volume(bundle, a, b, brain, batch_size, progress=progress)
        # both files are encoded, then replaced together (utils.atomic_replace_files): a
        # failure leaves the earlier pair as it was. A fused.nii.gz left by another model (a
        # 2-channel method has none) is removed with them, so the folder never mixes two
        # models' outputs
        blobs = {"seg": _nifti_bytes(paths["seg"], from_canonical(seg, scheme), affine, header)}
        if fused is not None:
            blobs["fused"] = _nifti_bytes(paths["fused"], fused, affine, header)
        removed = str(paths["fused"]) if fused is None and paths["fused"].is_file() else None
        replace = {paths[k]: blobs[k] for k in ("fused", "seg") if k in blobs}
        if removed:
            replace[paths["fused"]] = None
        try:
            atomic_replace_files(replace)
        except OSError as err:
            name = Path(err.filename).name if err.filename else "its files"
            what = ("remove the earlier fused.nii.gz, which this 2-channel method does not "
                    "replace" if name == "fused.nii.gz" and fused is None else f"write {name}")
            raise ValueError(f"--out {out_dir}: cannot {what} ({err.strerror}); the earlier "
                             "files there are unchanged") from err
    except BaseException:
        remove_empty_folders(made)
        raise
    return {
        "fused": str(paths["fused"]) if "fused" in blobs else None,
        "removed": removed,
        "mask_found": str(found_mask) if found_mask is not None else None,
        "scheme": scheme,
        "seg": str(paths["seg"]),
        "label_counts": label_counts(seg),
        "checkpoint": str(bundle.path),
        "epoch": bundle.epoch,
    }


def _warn_unless_held_out(run_dir: Path | None, cache: Path, split: str, ids: list[str],
                          manifest: dict[str, Any]) -> None:
    """Warn when the ``test``, ``val`` or ``all`` cases ``ids`` of ``cache`` may not be held
    out from the run in ``run_dir`` (:func:`~fuse4seg.utils.run_folder_of` of what
    ``evaluate`` was given).

    ``test`` and ``val`` are silent when ``cache``'s manifest is the one the run recorded
    (``run.json``'s ``data_checksum``: the data it was trained on, so its split is the run's).
    Otherwise the split the run recorded (``run.json``'s ``split``; for runs written before it
    was recorded, the split of the run's own cache if that still holds the recorded manifest)
    says which cases the run trained (and, for ``test``, validated) on, and the warning names
    those among ``ids``. Without either, the warning says the split cannot be checked: the
    manifests differ by their cases or settings (``data_checksum`` leaves paths out). ``all``
    names the cases the run trained or validated on among ``ids`` by the same split (on the
    run's own data: every case outside its test split), and is silent where the split cannot
    be found. Silent for a checkpoint outside a run folder and for ``train``, which asks for
    the trained cases. ``manifest`` is ``cache``'s, as the caller loaded it.
    """
    import warnings

    from fuse4seg.data.slices import load_manifest
    from fuse4seg.train.runs import data_checksum, read_run_json

    if run_dir is None or split not in ("test", "val", "all"):
        return
    info = read_run_json(run_dir)
    recorded = info.get("data_checksum")
    same = bool(recorded) and data_checksum(cache) == recorded
    if not recorded or (same and split != "all"):
        return
    trained_split, source = info.get("split"), "the split the run recorded"
    own = info.get("cache")
    if same:  # --split all on the run's own data: its split is this manifest's
        trained_split, source = manifest["split"], "its own split"
    if not isinstance(trained_split, dict):
        source = f"the split of the run's cache {own}"
        try:  # the split the run was trained with, if its cache still holds it
            trained_split = (load_manifest(own)["split"]
                             if own and data_checksum(own) == recorded else None)
        except (OSError, ValueError, KeyError, TypeError):
            trained_split = None
    if not isinstance(trained_split, dict):
        if split == "all":  # other data by choice: nothing to tell the user to do instead
            return
        warnings.warn(
            f"--data: cannot tell whether its {len(ids)} {split} cases are held out from run "
            f"{run_dir.name}: its manifest is not the one the run recorded (other cases or "
            f"settings), the run's run.json records no split, and its cache "
            f"({own or 'not recorded'}) is gone or was prepared again since. For other data, "
            "score every case with --split all.", stacklevel=3)
        return
    seen = ("train",) if split == "val" else ("train", "val")
    trained = {c for name in seen for c in trained_split.get(name) or []}
    overlap = [c for c in ids if c in trained]
    if overlap:
        shown = ", ".join(overlap[:3]) + (f" and {len(overlap) - 3} more" if len(overlap) > 3
                                          else "")
        advice = ("Score only its held-out cases with --split test, or leave the cases it saw "
                  "out of the data." if split == "all" else
                  "Give the data the run was trained on, or --split all for other data.")
        warnings.warn(
            f"--data: {len(overlap)} of its {len(ids)} {'' if split == 'all' else split + ' '}"
            f"cases are cases run "
            f"{run_dir.name} {'trained' if split == 'val' else 'trained or validated'} on "
            f"({shown}), by {source}: their scores are not held out. {advice}", stacklevel=3)


def evaluate_run(
    run: str | Path,
    data: str | Path,
    split: str = "test",
    json_out: str | Path | None = None,
    which: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """``fuse4seg evaluate``: per-case and mean Dice/IoU of a run on a split (``which``
    checkpoint: its EMA leader and its follower).

    Args:
        run: a run folder (or a checkpoint file).
        data: the raw folder or the prepared cache the run was trained on; the split's case
            ids come from the cache manifest (so they are the patients the run never trained
            on), the volumes from the raw files it lists. For other data, ``split="all"``.
        cache: where the cache of a raw ``data`` folder is or is prepared; default: the run's
            runs folder, ``cache-<hash>``, where ``train`` prepared it (the run folder's
            parent, also for a checkpoint in ``RUN/checkpoints/``; a checkpoint file elsewhere:
            its folder).
        split: ``"test"``, ``"val"``, ``"train"`` or ``"all"``.
        which: the checkpoint of a run folder (:func:`load_bundle`; default ``best``).
        json_out: also write the result there (atomically).

    Returns:
        ``{"run", "method", "profile", "checkpoint", "checkpoint_sha256", "code", "epoch",``
        ``"split", "cases", "per_case": {case: {class/region: {"dice", "iou"}}}, "mean",``
        ``"mean_dice", "mean_iou"}`` (the mean Dice and IoU of NCR, ED and ET, as in Table 3;
        ``code``: the scoring code's digest; ``epoch``: the last one the weights finished).

    Raises:
        ValueError: unknown or empty split, data that do not match the run.
    """
    from fuse4seg.data.slices import load_manifest
    from fuse4seg.metrics.segmentation import SegmentationMeter
    from fuse4seg.train.runs import resolve_cache
    from fuse4seg.utils import code_digest, file_sha256

    bundle = load_bundle(run, which=which, device=device)
    folder = run_folder_of(run)  # also RUN for RUN/checkpoints/best.pt
    runs_dir = folder.parent if folder is not None else Path(run).parent
    cache = resolve_cache(data, bundle.config, cache=cache, runs_dir=runs_dir, split_free=True,
                          progress=progress)
    manifest = load_manifest(cache)
    if split == "all":
        ids = list(manifest["cases"])
    elif split in manifest["split"]:
        ids = list(manifest["split"][split])
    else:
        raise ValueError(f"--split {split!r}: choose train, val, test or all")
    if not ids:
        raise ValueError(f"--split {split}: no cases in this split of {cache} (its split: "
                         f"{ {k: len(v) for k, v in manifest['split'].items()} }); "
                         "--split all scores every case")
    _warn_unless_held_out(folder, cache, split, ids, manifest)
    info = {c["case_id"]: c for c in manifest["case_info"]}
    meter = SegmentationMeter()
    cases = ids
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(ids, desc=f"scoring {split}", unit="case", leave=False)
    for cid in cases:
        slices, brain_mask, seg = _scored_case(info[cid], bundle.config.data)
        _, pred = predict_volume(bundle, None, None, brain_mask, batch_size, fused=False,
                                 slices=slices)
        meter.update(pred, seg, cid)
    scores = meter.compute()
    mean = scores["mean"]
    result = {
        "run": str(run),
        "method": bundle.method,
        "profile": bundle.config.profile,
        "checkpoint": bundle.path.name,
        "checkpoint_sha256": file_sha256(bundle.path),
        "code": code_digest(),
        "epoch": bundle.epoch,
        "data": str(data),
        "split": split,
        "cases": ids,
        "per_case": scores["per_case"],
        "mean": mean,
        "mean_dice": tumour_mean(mean, "dice"),
        "mean_iou": tumour_mean(mean, "iou"),
    }
    if json_out is not None:
        atomic_write_json(Path(json_out), result)
    return result
