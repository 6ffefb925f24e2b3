"""Finding BraTS cases on disk: which layout a folder is in and which file is which.

The layouts, the ``named`` layout's patterns and the error for an unrecognised folder are
explained in :mod:`fuse4seg.data.layouts` (which re-exports everything here); reading the files
is there too. Explained in chapter 1 (``book/01_data.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LAYOUTS",
    "NAMED_PATTERNS",
    "CaseFiles",
    "DataError",
    "detect_layout",
    "expected_names",
    "find_cases",
]

LAYOUTS = ("brats2021", "brats2023", "brats2013", "msd", "named")
SCHEME_OF_LAYOUT = {layout: layout for layout in LAYOUTS}
SCHEME_OF_LAYOUT["named"] = "auto"  # read from the label values (module docstring)
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
    problems: dict[str, str] = field(default_factory=dict)
    """Why a role of a case has no file: several files fit it (any layout), or, in a ``named``
    case, an explicit pattern matches no file or one file would be two roles';
    :func:`~fuse4seg.data.layouts.load_case` raises it for a role it needs, so ``data check``
    marks that one case bad instead of stopping."""

    @property
    def scheme(self) -> str:
        return SCHEME_OF_LAYOUT[self.layout]


def _stem_matches(folder: Path, stems: list[str]) -> list[Path]:
    """The NIfTI files of the first of ``stems`` (globs without the extension, in order of
    preference) that matches any: ``.nii.gz`` and ``.nii`` together, sorted by name."""
    for stem in stems:
        hits = sorted({p for pattern in _nifti_patterns([stem]) for p in folder.glob(pattern)
                       if not p.name.startswith(".")})  # a folder too: reading names it
        if hits:
            return hits
    return []


def _ambiguous(folder: Path, role: str, hits: list[Path], how: str) -> str:
    """The problem of a ``role`` that several files fit: it names them, so the user can move
    the extra one away (a case whose labels came from the wrong file would train on them
    without a word)."""
    return (f"{len(hits)} files in {folder} fit the {role} file ({how}): "
            f"{', '.join(p.name for p in hits)}; move the extra one out of the case folder")


def _nifti_patterns(stem_patterns: list[str]) -> list[str]:
    return [s + ext for s in stem_patterns for ext in NIFTI]


_SIGNATURES = {
    # layout -> patterns whose presence marks a case folder of that layout
    "brats2021": ["*_t1ce", "*_flair", "*_seg"],
    "brats2023": ["*-t1c", "*-t2f", "*-seg"],
    "brats2013": ["OTMultiClass*", "brainmask*"],
}

_TOKEN = r"(?:^|[_\-. ]){}(?:$|[_\-. ])"
NAMED_WORDS: dict[str, tuple[str, ...]] = {
    "t1ce": ("t1ce", "t1c", "t1gd", "t1_ce", "t1-ce", "t1_gd", "t1post", "t1_post"),
    "flair": ("flair", "t2f", "t2_flair", "t2flair"),
    "seg": ("seg", "segmentation", "label", "labels", "gt", "groundtruth", "ground_truth"),
    "mask": ("brainmask", "brain_mask", "brain-mask"),
}
"""The ``named`` layout's words for each file (also named in its errors)."""
NAMED_PATTERNS: dict[str, str] = {
    # key -> regular expression on the lower-case file name without its NIfTI extension
    key: _TOKEN.format("(?:" + "|".join(words) + ")") for key, words in NAMED_WORDS.items()
}
"""The ``named`` layout: how each file is recognised (token-delimited, any case)."""


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(NIFTI) and not p.name.startswith(".")
    )


def _stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name.lower())


def _named_case(folder: Path, patterns: dict[str, str] | None = None) -> CaseFiles | None:
    """The ``named`` case of ``folder``: explicit glob ``patterns`` (case-sensitive, as given)
    or :data:`NAMED_PATTERNS`.

    A role gets no file, and a :attr:`CaseFiles.problems` entry that says why, when its
    explicit pattern matches no file or more than one (instead of taking the first), when
    without patterns its words fit several files and not exactly one of them fits no other
    role's words (a file that also fits another role's words, ``sub01_t1post_brainmask``,
    gives way to the one that does not), or when its file is already another role's (e.g.
    ``--t1ce-pattern '*.nii.gz'`` also matching the FLAIR file).

    Returns ``None`` when explicit patterns are given and the folder holds no NIfTI file: it
    is not a case (without patterns, never ``None``). A folder with NIfTI files that neither
    image pattern matches is a case with a problem for each, a bad case that ``data check``
    lists and ``--skip-bad`` leaves out like any other.
    """
    files = _nifti_files(folder)
    paths: dict[str, Path | None] = {}
    problems: dict[str, str] = {}
    for key, regex in NAMED_PATTERNS.items():
        if patterns and patterns.get(key):
            flag = f"--{key.replace('_', '-')}-pattern {patterns[key]!r}"
            hits = sorted(p for p in folder.glob(patterns[key]) if p in files)
            if len(hits) > 1:
                problems[key] = (f"{flag} matches {len(hits)} files in {folder} "
                                 f"({', '.join(p.name for p in hits)}); give a pattern that "
                                 "matches one")
                hits = []
            elif not hits:
                problems[key] = (f"{flag} matches no file in {folder} (files found: "
                                 f"{', '.join(p.name for p in files) or 'none'})")
        else:
            hits = [p for p in files if re.search(regex, _stem(p))]
            if len(hits) > 1:  # the one file that fits no other role's words is this role's
                own = [p for p in hits if not any(
                    re.search(other, _stem(p)) for k, other in NAMED_PATTERNS.items() if k != key)]
                if len(own) == 1:
                    hits = own
                else:
                    problems[key] = _ambiguous(folder, key, own or hits, "the words "
                                               + ", ".join(NAMED_WORDS[key]))
                    hits = []
        paths[key] = hits[0] if hits else None
    if patterns and not files:
        return None
    roles: dict[Path, str] = {}
    for key, path in paths.items():
        if path is not None and path in roles:
            problems[key] = (f"{path.name} would be read as both {roles[path]} and {key}; give "
                             f"--{roles[path]}-pattern and --{key}-pattern that tell them apart")
            paths[key] = None
        elif path is not None:
            roles[path] = key
    return CaseFiles(folder.name, "named", paths, problems)


def detect_layout(folder: str | Path) -> str | None:
    """The layout of a case folder (or of a dataset folder, for ``msd``), or ``None``."""
    folder = Path(folder)
    if (folder / "imagesTr").is_dir():
        return "msd"
    # a layout whose signature files are mostly there wins; one stray match (``sub01_flair``
    # beside ``sub01_t1gd``) gives way to the named layout, and is kept only when nothing else
    # fits (so a case missing a modality still reports the missing file)
    hits = {
        layout: sum(bool(_stem_matches(folder, [stem])) for stem in stems)
        for layout, stems in _SIGNATURES.items()
    }
    best = max(hits, key=lambda k: hits[k])
    if hits[best] >= 2 or (best == "brats2013" and hits[best] >= 1):
        return best
    if folder.is_dir():
        named = _named_case(folder)
        # a role that several files fit still marks the layout (the case is then a bad one)
        if all(named.paths[k] is not None or k in named.problems for k in ("t1ce", "flair")):
            return "named"
    return best if hits[best] else None


def _unrecognised(folder: Path, files: list[Path]) -> DataError:
    tried = "; ".join(
        [f"{layout}: {', '.join(stems)}" for layout, stems in _SIGNATURES.items()]
        + [f"named ({k}): /{r}/ on the lower-case stem" for k, r in NAMED_PATTERNS.items()]
    )
    return DataError(
        f"case folder {folder}: no layout recognised. Files found: "
        f"{', '.join(p.name for p in files)}. Patterns tried: {tried}. Give --layout and "
        f"explicit --t1ce-pattern/--flair-pattern/--seg-pattern to read it"
    )


_LAYOUT_FILES: dict[str, dict[str, list[str]]] = {
    # layout -> role -> the file-name stems looked for, in order of preference (several files
    # for the first stem that matches: a bad case that names them)
    "brats2021": {"t1ce": ["*_t1ce"], "flair": ["*_flair"], "seg": ["*_seg"]},
    "brats2023": {"t1ce": ["*-t1c"], "flair": ["*-t2f"], "seg": ["*-seg"]},
    "brats2013": {
        "t1ce": ["T1c*"],
        "flair": ["Flair*"],
        "seg": ["OTMultiClass*", "OT*"],
        "mask": ["brainmask*"],
    },
}


def expected_names(layout: str, role: str) -> str:
    """The file names a ``layout``'s case folder is searched for its ``role`` file, for an
    error message (``"*_flair.nii.gz or *_flair.nii"``; for ``named``, the words of
    ``NAMED_WORDS``; ``""`` where the layout has none)."""
    if layout == "named" and role in NAMED_WORDS:
        return f"NIfTI file with one of the words {', '.join(NAMED_WORDS[role])} in its name"
    stems = _LAYOUT_FILES.get(layout, {}).get(role, [])
    return " or ".join(f"{stem}{ext}" for stem in stems for ext in NIFTI)


def _case_files(folder: Path, layout: str) -> CaseFiles:
    if layout == "named":
        return _named_case(folder)
    if layout not in _LAYOUT_FILES:
        raise DataError(f"{folder}: unknown layout {layout!r}; choose one of {LAYOUTS}")
    paths: dict[str, Path | None] = {}
    problems: dict[str, str] = {}
    for key, stems in _LAYOUT_FILES[layout].items():
        hits = _stem_matches(folder, stems)
        if len(hits) > 1:
            problems[key] = _ambiguous(folder, key, hits, f"layout {layout}: "
                                       + expected_names(layout, key))
            hits = []
        paths[key] = hits[0] if hits else None
    return CaseFiles(case_id=folder.name, layout=layout, paths=paths, problems=problems)


def _msd_cases(root: Path) -> list[CaseFiles]:
    def by_id(folder: Path) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.name.endswith(NIFTI) and p.name[0] != ".":
                    found.setdefault(re.sub(r"\.nii(\.gz)?$", "", p.name), []).append(p)
        return found

    labels = by_id(root / "labelsTr")
    cases = []
    for case_id, images in by_id(root / "imagesTr").items():
        paths: dict[str, Path | None] = {}
        problems: dict[str, str] = {}
        for key, found in (("t1ce", images), ("flair", images),
                           ("seg", labels.get(case_id, []))):
            if len(found) > 1:  # X.nii beside X.nii.gz
                problems[key] = _ambiguous(found[0].parent, key, found, "layout msd")
            paths[key] = found[0] if len(found) == 1 else None
        cases.append(CaseFiles(case_id=case_id, layout="msd", paths=paths, problems=problems))
    return cases


def find_cases(
    root: str | Path, layout: str | None = None, patterns: dict[str, str] | None = None
) -> list[CaseFiles]:
    """All cases under ``root``, sorted by id.

    ``root`` may be a dataset folder (one sub-folder per case), a single case folder, or an MSD
    Task01 folder (with ``imagesTr/``). ``layout=None`` detects the layout of each case; a
    ``layout`` reads every folder that holds NIfTI files as a case of that layout (a file its
    names do not find is then missing from that case, which ``data check`` reports).
    ``patterns`` (``{"t1ce": glob, "flair": glob, "seg": glob, "mask": glob}``, any subset)
    overrides detection: every case folder is read as ``named`` with those globs.

    Raises:
        DataError: ``root`` is missing or holds no recognisable case; a case folder holds NIfTI
            files but no recognisable case (the message lists them and the patterns tried);
            ``layout`` is unknown.
    """
    root = Path(root)
    if patterns:
        unknown = sorted(set(patterns) - set(NAMED_PATTERNS))
        if unknown:
            raise DataError(f"patterns: unknown keys {unknown}; use {sorted(NAMED_PATTERNS)}")
        if layout not in (None, "named"):
            raise DataError(f"patterns need layout 'named' (or none), not {layout!r}")
        layout = "named"
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
        own = detect_layout(root) if not patterns else None
        # a forced layout reads ``root`` as one case when it holds NIfTI files and no
        # sub-folder does (a stray file beside the case folders does not make it a case)
        single = own is not None or (patterns and _nifti_files(root)) or (
            layout is not None and _nifti_files(root)
            and not any(_nifti_files(p) for p in root.iterdir() if p.is_dir()))
        folders = [root] if single else sorted(p for p in root.iterdir() if p.is_dir())
        cases = []
        for folder in folders:
            if patterns:
                case = _named_case(folder, patterns)
                # a folder without NIfTI files is not a case; one whose patterns match no
                # file, or several, is, and is reported bad when read
                if case is not None:
                    cases.append(case)
                continue
            if layout is not None:  # forced: a folder with NIfTI files is a case of that layout
                if _nifti_files(folder):
                    cases.append(_case_files(folder, layout))
                continue
            found = detect_layout(folder)
            if found is None:
                files = _nifti_files(folder)
                if files:
                    raise _unrecognised(folder, files)
                continue
            if found == "msd":
                continue
            cases.append(_case_files(folder, found))
    if not cases:
        raise DataError(
            f"{root}: no BraTS cases found. Expected sub-folders with <ID>_t1ce/_flair/_seg "
            f"(BraTS 2018-2021), <ID>-t1c/-t2f/-seg (BraTS 2023+), T1c*/Flair*/OTMultiClass* "
            f"(BRATS 2013/2015) NIfTI files, or an MSD Task01 folder with imagesTr/"
        )
    return sorted(cases, key=lambda c: c.case_id)
