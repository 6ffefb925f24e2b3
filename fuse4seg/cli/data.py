"""The ``fuse4seg data`` verbs: ``phantom``, ``check`` and ``prepare``.

None of them imports torch at load time, and ``check`` not at all (``tests/test_cli.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fuse4seg.cli.common import (
    PROFILES,
    add_json,
    add_set,
    config_of,
    given,
    positive_int,
    seed_int,
    write_json,
)

LAYOUT_HELP = "read every case with this layout's file names (default: detect each case's)"


def phantom_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", type=positive_int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=seed_int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    parser.add_argument(
        "--workers", type=positive_int, default=1, metavar="N",
        help="write cases in N processes (same bytes as one; default 1)",
    )


def phantom_main(args: argparse.Namespace) -> int:
    """Write the built-in MNI152 phantom dataset (BraTS 2021 layout, T1ce + FLAIR + seg).

    Example: ``fuse4seg data phantom --out _data/phantom --cases 8 --seed 0``. Made offline from
    the MNI152 maps inside nilearn; see ``fuse4seg.data.phantom`` and chapter 1.
    """
    from fuse4seg.data.phantom import write_phantom_dataset
    from fuse4seg.utils import check_output_folder

    check_output_folder(args.out, "--out")  # named as given, before any case is made
    folders = write_phantom_dataset(
        args.out, cases=args.cases, seed=args.seed, progress=not args.quiet,
        workers=args.workers,
    )
    print(f"wrote {len(folders)} phantom cases to {args.out}")
    return 0


def _layouts() -> tuple[str, ...]:
    from fuse4seg.data.layouts import LAYOUTS

    return tuple(LAYOUTS)


def _pattern_arguments(parser: argparse.ArgumentParser) -> None:
    for key, example in (("t1ce", "'*T1post*'"), ("flair", "'*FLAIR*'"), ("seg", "'*roi*'")):
        parser.add_argument(
            f"--{key}-pattern", metavar="GLOB",
            help=f"glob of the {key} file in each case folder, e.g. {example} (reads every "
            "case as the 'named' layout; overrides detection)",
        )


def _patterns(args: argparse.Namespace) -> dict[str, str] | None:
    given = {k: getattr(args, f"{k}_pattern") for k in ("t1ce", "flair", "seg")}
    given = {k: v for k, v in given.items() if v}
    return given or None


def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of BraTS cases (or one case)")
    parser.add_argument("--layout", choices=_layouts(), help=LAYOUT_HELP)
    _pattern_arguments(parser)
    add_json(parser, "the per-case summaries")
    parser.add_argument(
        "--workers", type=positive_int, default=1, metavar="N",
        help="process N cases at once in separate processes (same output as 1)",
    )


def check_main(args: argparse.Namespace) -> int:
    """Check every case of a BraTS folder; exit 1 naming each bad case.

    For each case: the layout, the shape and voxel counts per canonical label (background, NCR,
    ED, ET), or the errors (missing modality, shape/affine mismatch, NaN/inf, all-zero volume,
    labels outside the scheme, unreadable file).
    """
    from fuse4seg.data.layouts import check_dataset, check_table
    from fuse4seg.utils import check_output_file

    if args.json not in (None, "-"):  # before any case is read
        check_output_file(args.json, "--json", given(args, "DATA_DIR"))
    summaries = check_dataset(
        args.data_dir, args.layout, progress=args.json != "-", workers=args.workers,
        patterns=_patterns(args),
    )
    bad = [s for s in summaries if s["errors"]]
    if args.json != "-":
        print("\n".join(check_table(summaries)))
    if args.json is not None:
        write_json(summaries, args.json)
    for s in bad:
        for error in s["errors"]:
            error = error.removeprefix(f"case {s['case_id']}: ")
            print(f"fuse4seg: bad case {s['case_id']}: {error}", file=sys.stderr)
    return 1 if bad else 0


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of BraTS cases")
    parser.add_argument("--out", type=Path, required=True, help="cache folder to write")
    parser.add_argument("--profile", default="default", help=PROFILES)
    parser.add_argument("--layout", choices=_layouts(), help=LAYOUT_HELP)
    _pattern_arguments(parser)
    add_set(parser, "data.crop_size=192", "data prepare")
    parser.add_argument(
        "--workers", type=positive_int, default=1, metavar="N",
        help="process N cases at once in separate processes (same output as 1)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true",
        help="leave bad cases out (listed, and in the manifest's 'skipped') instead of "
        "stopping at the first",
    )


def prepare_main(args: argparse.Namespace) -> int:
    """Prepare the slice cache of a BraTS folder (normalised, cropped axial slices).

    Writes memory-mappable arrays per case and manifest.json (cases, kept slices, the seeded
    patient-level split, settings, source checksums). Re-running with the same inputs does
    nothing; changed inputs or settings rebuild.
    """
    from fuse4seg.data.slices import load_manifest, prepare_cache
    from fuse4seg.utils import check_output_folder

    config = config_of(args.profile, args.set, args._set_verb)
    check_output_folder(args.out, "--out")  # before any case is read
    manifest_path = args.out / "manifest.json"
    before = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    path = prepare_cache(
        args.data_dir, args.out, config.data, layout=args.layout, workers=args.workers,
        patterns=_patterns(args), skip_bad=args.skip_bad,
    )
    manifest = load_manifest(args.out)
    changed = before is None or path.stat().st_mtime_ns != before
    split = {k: len(v) for k, v in manifest["split"].items()}
    skipped = manifest.get("skipped", [])
    print(
        f"{'wrote' if changed else 'up to date:'} {path}: {len(manifest['cases'])} cases, "
        f"{manifest['num_slices']} slices, split {split}"
        + (f"; {len(skipped)} bad case(s) left out" if skipped else "")
    )
    empty = [name for name in ("val", "test") if not manifest["split"].get(name)]
    if empty and changed:
        import warnings

        n = len(manifest["cases"])
        warnings.warn(
            f"--out {args.out}: its {' and '.join(empty)} "
            f"{'split is' if len(empty) == 1 else 'splits are'} empty ({n} case{'s' * (n != 1)}, "
            f"data.split_fractions {list(config.data.split_fractions)}): add cases, or score "
            "other data with `fuse4seg evaluate --split all`", stacklevel=2)
    for entry in skipped:  # the loader's message often starts "case ID: " already
        print(f"  left out {entry['case_id']}: "
              + str(entry["error"]).removeprefix(f"case {entry['case_id']}: "))
    return 0
