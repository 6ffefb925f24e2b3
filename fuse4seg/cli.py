"""The ``fuse4seg`` command line: every verb, its options and what it prints, in one module.

Each verb is a pair ``<verb>_arguments(parser)`` / ``<verb>_main(args) -> int`` registered in
:data:`COMMANDS`; the logic lives in the package (the mains only call it). Nothing heavy is
imported at load time: torch is imported by the verbs that train or run networks, so
``fuse4seg --help``, ``--version``, ``metrics`` and ``data check`` answer without it.

Expected failures (bad input, missing files, invalid settings) print one
``fuse4seg: error: ...`` line naming the file or parameter and exit with status 2; nothing is
left half-written (outputs go through ``fuse4seg.utils.atomic_write_*``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["COMMANDS", "build_parser", "main"]

_PROFILES = "smoke, default or paper"
_PAIR_KINDS = ["CT-MRI", "PET-MRI", "SPECT-MRI", "GFP-PC"]


def _add_set(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help=f"override a setting, e.g. --set {example} (repeatable)",
    )


def _config(profile: str, pairs: list[str]):
    from fuse4seg.config import get_config, parse_overrides

    return get_config(profile, parse_overrides(pairs))


# ============================================================================ data


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a size), refused otherwise with its value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def phantom_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", type=positive_int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    parser.add_argument(
        "--workers", type=positive_int, default=1,
        help="write cases in N processes (same bytes as one; default 1)",
    )


def phantom_main(args: argparse.Namespace) -> int:
    """Write the built-in MNI152 phantom dataset (BraTS 2021 layout, T1ce + FLAIR + seg).

    Example: ``fuse4seg data phantom --out _data/phantom --cases 8 --seed 0``. Made offline from
    the MNI152 maps inside nilearn; see ``fuse4seg.data.phantom`` and chapter 1.
    """
    from fuse4seg.data.phantom import write_phantom_dataset

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
    parser.add_argument("--layout", choices=_layouts(), help="force a layout (default: detect)")
    _pattern_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.add_argument(
        "--workers", type=positive_int, default=1,
        help="process this many cases at once in separate processes (same output as 1)",
    )


def check_main(args: argparse.Namespace) -> int:
    """Check every case of a BraTS folder; exit 1 naming each bad case.

    For each case: the layout, the shape and voxel counts per canonical label (background, NCR,
    ED, ET), or the errors (missing modality, shape/affine mismatch, NaN/inf, all-zero volume,
    labels outside the scheme, unreadable file).
    """
    from fuse4seg.data.layouts import check_dataset, check_table

    summaries = check_dataset(
        args.data_dir, args.layout, progress=not args.json, workers=args.workers,
        patterns=_patterns(args),
    )
    bad = [s for s in summaries if s["errors"]]
    print(json.dumps(summaries, indent=2) if args.json else "\n".join(check_table(summaries)))
    for s in bad:
        for error in s["errors"]:
            error = error.removeprefix(f"case {s['case_id']}: ")
            print(f"fuse4seg: bad case {s['case_id']}: {error}", file=sys.stderr)
    return 1 if bad else 0


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of BraTS cases")
    parser.add_argument("--out", type=Path, required=True, help="cache folder to write")
    parser.add_argument("--profile", default="default", help=_PROFILES)
    parser.add_argument("--layout", choices=_layouts(), help="force a layout (default: detect)")
    _pattern_arguments(parser)
    _add_set(parser, "data.crop_size=192")
    parser.add_argument(
        "--workers", type=positive_int, default=1,
        help="process this many cases at once in separate processes (same output as 1)",
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

    config = _config(args.profile, args.set)
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
    for entry in skipped:  # the loader's message often starts "case ID: " already
        print(f"  left out {entry['case_id']}: "
              + str(entry["error"]).removeprefix(f"case {entry['case_id']}: "))
    return 0


# ============================================================================ train, use


def train_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.train.methods import ABLATIONS, METHODS

    parser.add_argument("--method", choices=METHODS,
                        help="what to train (default: fuse4seg)")
    parser.add_argument(
        "--ablation", choices=sorted(ABLATIONS),
        help="a Table 3 variant (sets the method and the loss switches): baseline, A, B, full",
    )
    parser.add_argument("--profile", default="default", help=_PROFILES)
    parser.add_argument(
        "--data", type=Path, required=True,
        help="raw BraTS/phantom folder, or a prepared cache (a folder with manifest.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder")
    parser.add_argument("--cache", type=Path, help="where to prepare the cache of a raw folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--restart-if-code-changed", action="store_true",
        help="with --resume: start the run again when it was written by other fuse4seg code "
        "(default: warn and continue)",
    )
    _add_set(parser, "train.inner_steps=3")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default: the config's)")
    parser.add_argument(
        "--checkpoint-every-steps", type=positive_int, metavar="N",
        help="also write checkpoints/last.pt every N outer steps",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_main(args: argparse.Namespace) -> int:
    """Train a method (Algorithm 1, a baseline or an ablation) into RUNS/<method>-<profile>-<hash>.

    The run folder holds config.yaml, run.json (method, commit, data), metrics.jsonl and
    checkpoints/{last,best,ema}.pt. With --resume an interrupted run continues from last.pt and
    ends exactly as an uninterrupted one would (CPU). Under `torchrun --nproc_per_node N -m
    fuse4seg train ...` it trains with DistributedDataParallel.
    """
    import torch.distributed as dist

    from fuse4seg.config import parse_overrides
    from fuse4seg.train.distributed import dist_info
    from fuse4seg.train.methods import check_ablation
    from fuse4seg.train.trainer import train
    from fuse4seg.utils import check_output_folder

    check_output_folder(args.out, "--out")  # before the data is prepared or a network built
    check_ablation(args.ablation, args.method, parse_overrides(args.set))  # before any work
    result = train(
        _config(args.profile, args.set),
        method=args.method or "fuse4seg",
        data=args.data,
        out=args.out,
        cache=args.cache,
        resume=args.resume,
        restart_if_code_changed=args.restart_if_code_changed,
        checkpoint_every_steps=args.checkpoint_every_steps,
        progress=not args.no_progress,
        ablation=args.ablation,
        device=args.device,
    )
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if dist_info()[0] == 0:
        best = result.best
        summary = (
            f"best validation mean Dice {best['mean_dice']:.4f} (epoch {best['epoch']})"
            if best
            else "no validation yet"
        )
        print(f"run folder: {result.run_dir}\n{summary}")
    return 0


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a run folder (or a checkpoint file)")
    parser.add_argument(
        "--data", type=Path, required=True,
        help="the prepared cache or raw folder the run was trained on (its split says which "
        "cases are test cases); other data: use --split all",
    )
    parser.add_argument(
        "--cache", type=Path,
        help="where the cache of a raw --data folder is (or is prepared); default: the one "
        "`train` prepared for it in the run's runs folder (cache-<hash>)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                        help="cases to score (default: test)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--which", choices=["best", "ema", "last"],
                        help="checkpoint of a run folder (default: best, else ema)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: 4 on a CPU, 16 on a GPU)")


def evaluate_main(args: argparse.Namespace) -> int:
    """Dice/IoU per case and region of a run on a split (its best checkpoint by default).

    Whole volumes at the input's resolution (3-D counts per case); the split's patients come from
    the cache's manifest: with the raw folder the run was trained on, that is the run's own
    cache, so ``test`` holds the patients it never trained on.
    """
    from fuse4seg.inference import evaluate_run
    from fuse4seg.utils import check_output_file
    if args.json is not None:
        check_output_file(args.json, "--json", [("--data", args.data), ("--cache", args.cache)],
                          [("RUN", args.run)])  # before minutes of scoring, not after
    result = evaluate_run(
        args.run, args.data, split=args.split, json_out=args.json, which=args.which,
        device=args.device, batch_size=args.batch_size, cache=args.cache, progress=True,
    )
    lines = [
        f"{result['method']} ({result['profile']}), {result['split']} split, "
        f"{len(result['cases'])} cases, checkpoint {result['checkpoint']}"
    ]
    for name, values in result["mean"].items():
        lines.append(f"  {name:>10}: Dice {values['dice']:.4f}  IoU {values['iou']:.4f}")
    lines.append(f"  mean Dice (NCR, ED, ET) {result['mean_dice']:.4f}")
    print("\n".join(lines))
    if args.json is None:
        print(json.dumps({"mean_dice": result["mean_dice"], "mean_iou": result["mean_iou"]}))
    return 0


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="run folder or .pt file")
    parser.add_argument("--t1ce", type=Path, required=True, help="T1ce NIfTI")
    parser.add_argument("--flair", type=Path, required=True, help="FLAIR NIfTI (same grid)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--scheme",
        help="label scheme of seg.nii.gz (brats2021, brats2023, brats2013, msd); "
        "default: guessed from the file name, else the training data's",
    )
    parser.add_argument(
        "--mask", type=Path,
        help="brain mask NIfTI (default: a BRATS 2013/2015 case folder's brainmask, else "
        "where T1ce or FLAIR is non-zero)",
    )
    parser.add_argument("--which", choices=["best", "ema", "last"],
                        help="checkpoint of a run folder (default: best, else ema)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: 4 on a CPU, 16 on a GPU)")


def predict_main(args: argparse.Namespace) -> int:
    """Fuse and segment one case: writes fused.nii.gz and seg.nii.gz with the input's affine.

    Open them in ITK-SNAP or 3D Slicer. Labels are written in the input's scheme (BraTS 2021:
    ET = 4).
    """
    from fuse4seg.inference import predict_files

    written = predict_files(
        args.checkpoint, args.t1ce, args.flair, args.out, scheme=args.scheme,
        batch_size=args.batch_size, device=args.device, which=args.which,
        mask=args.mask, progress=True,
    )
    print(f"checkpoint: {written['checkpoint']} (epoch {written['epoch']})")
    if written["mask_found"]:
        print(f"brain mask: {written['mask_found']} (the case folder's)")
    for key in ("fused", "seg"):
        if written[key]:
            print(f"wrote {written[key]}")
    if written["fused"] is None:
        print("(a 2-channel method has no fused image)")
    print(f"labels ({written['scheme']} scheme): {written['label_counts']}")
    return 0


def study_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.train.methods import METHODS

    parser.add_argument(
        "--methods", nargs="+", default=["fuse4seg", "average"], choices=METHODS,
        help="methods to train (the first is compared with each of the others)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed values")
    parser.add_argument("--profile", default="default", help=_PROFILES)
    parser.add_argument("--data", type=Path, required=True, help="raw folder or prepared cache")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder")
    _add_set(parser, "train.rollout_epochs=20")
    parser.add_argument("--device", help="auto, cpu, cuda (default: the config's)")
    parser.add_argument("--json", type=Path, help="write per-seed, per-case scores here")


def study_main(args: argparse.Namespace) -> int:
    """Train methods over several seeds; per-case test Dice and paired 95 % intervals.

    Every method is trained once per seed on the same split (finished runs are reused) and
    scored on every test case; the first method is compared with each other one by the mean
    paired difference of per-case mean Dice, with a bootstrap interval over test cases and seeds.
    """
    from fuse4seg.study import run_study
    from fuse4seg.utils import atomic_write_json, check_output_file
    config = _config(args.profile, args.set)
    if args.json is not None:
        check_output_file(args.json, "--json", [("--data", args.data)])  # before any training
    report = run_study(config, args.methods, args.data, args.out, args.seeds, args.device,
                       echo=print)
    if args.json is not None:
        atomic_write_json(args.json, report)
    return 0


# ============================================================================ fusion, metrics


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", type=Path, required=True,
        help="Harvard folder (holding PET-MRI/, ...) or the GFP folder (GFP/, PC/)",
    )
    parser.add_argument("--kind", required=True, choices=_PAIR_KINDS)
    parser.add_argument("--only", help="comma-separated pair names to use (default: all)")
    parser.add_argument("--exclude", help="comma-separated pair names to leave out")
    parser.add_argument("--max-pairs", type=positive_int,
                        help="use at most N pairs (sorted by name)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: config)")


def _load_pairs(args: argparse.Namespace, split: str):
    from fuse4seg.train.fusion_only import load_pairs

    return load_pairs(
        args.pairs, args.kind, split, _names(args.only), _names(args.exclude), args.max_pairs
    )


def fusion_train_arguments(parser: argparse.ArgumentParser) -> None:
    _pair_arguments(parser)
    parser.add_argument(
        "--split", default="train", choices=["train", "test"],
        help="Harvard split to train on (GFP-PC has one set; use --exclude)",
    )
    parser.add_argument("--profile", default="default", help=_PROFILES)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder")
    parser.add_argument("--steps", type=positive_int, help="leader updates (default: fusion.steps)")
    parser.add_argument("--crop", type=positive_int, help="crop side (default: fusion.crop)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="crops per step (default: fusion.batch)")
    parser.add_argument("--lr", type=float, help="base learning rate (default: fusion.lr)")
    parser.add_argument("--seed", type=int)
    _add_set(parser, "loss.beta_grad=2")
    parser.add_argument("--force", action="store_true", help="retrain even if the run exists")


def fusion_train_main(args: argparse.Namespace) -> int:
    """Train the fusion leader on image pairs with the physical losses only (no labels).

    Writes RUNS/fusion-<kind>-<profile>-<hash>/ (config, run.json, metrics.jsonl,
    checkpoints/leader.pt) and prints its path; a finished run with the same settings is reused.
    """
    from fuse4seg.train.fusion_only import train_fusion
    from fuse4seg.utils import check_output_folder

    if args.kind == "GFP-PC" and args.split != "train":
        raise ValueError("--split: GFP-PC has a single set; choose pairs with --only/--exclude")
    config = _config(args.profile, args.set)
    check_output_folder(args.out, "--out")
    pairs = _load_pairs(args, args.split)
    run = train_fusion(
        pairs, config, args.out, args.kind, steps=args.steps, crop=args.crop,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        force=args.force, progress=True,
    )
    last = run.history[-1] if run.history else {}
    state = "reused" if run.reused else "trained"
    print(
        f"{state} {run.run_dir} on {len(pairs)} {args.kind} pairs; last logged loss: "
        f"{last.get('total', float('nan')):.4g}"
    )
    return 0


def _conventions() -> list[str]:
    from fuse4seg.metrics.fusion import CONVENTIONS

    return [*CONVENTIONS, "all"]


def fusion_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "method",
        help="a fusion run folder / leader checkpoint (fusion-only or a BraTS run), or a rule: "
        "average, max, dwt",
    )
    _pair_arguments(parser)
    parser.add_argument("--split", choices=["train", "test"],
                        help="Harvard split to score (default: test; GFP-PC has one set)")
    parser.add_argument("--convention", default="standard", choices=_conventions())
    parser.add_argument("--json", type=Path, help="write the metrics (per pair and mean) here")
    parser.add_argument("--images", type=Path, help="write fused grey and colour PNGs here")


def fusion_evaluate_main(args: argparse.Namespace) -> int:
    """Fuse the test pairs with a trained leader or a classical rule and score them.

    Prints the mean of every metric under the chosen convention(s); --json writes per-pair and
    mean values, --images the fused Y and colour PNGs.
    """
    from fuse4seg.fusion_baselines import BASELINES
    from fuse4seg.metrics.files import conventions_of, table_lines
    from fuse4seg.metrics.fusion import nan_to_none
    from fuse4seg.train.fusion_only import evaluate_fusion, load_fusion_leader
    from fuse4seg.utils import atomic_write_json, check_output_file, check_output_folder
    conventions = conventions_of(args.convention)
    run = None if args.method in BASELINES else args.method
    if args.json is not None:
        check_output_file(args.json, "--json", [("--pairs", args.pairs)], [("METHOD", run)])
    if args.images is not None:  # before any pair is fused
        check_output_folder(args.images, "--images", [("--pairs", args.pairs)], [("METHOD", run)])
    if args.kind == "GFP-PC" and args.split is not None:
        raise ValueError(f"--split {args.split}: GFP-PC has a single set, scored whole; choose "
                         "pairs with --only/--exclude")
    split = "all" if args.kind == "GFP-PC" else (args.split or "test")
    pairs = _load_pairs(args, split)
    leader, label, source = None, args.method, None
    if args.method not in BASELINES:
        if not Path(args.method).exists():
            raise FileNotFoundError(
                f"{args.method}: neither a rule ({', '.join(BASELINES)}) nor a fusion run "
                "folder or checkpoint"
            )
        leader, _, source = load_fusion_leader(args.method, device=args.device or "auto")
        label = f"leader:{Path(args.method).name}"
    result = evaluate_fusion(
        pairs, label if leader is None else "leader", leader, conventions, args.images
    )
    out = {
        "method": label, "leader": source, "kind": args.kind, "split": split,
        "data": str(args.pairs), "pairs": result["pairs"], "metrics": result["metrics"],
    }
    if args.json is not None:
        atomic_write_json(args.json, nan_to_none(out))
    means = {conv: res["mean"] for conv, res in result["metrics"].items()}
    header = f"{label} on {len(pairs)} {args.kind} {split} pairs of {args.pairs}; "
    header += "convention: {conv}"
    print("\n".join(table_lines(means, header)))
    return 0


def metrics_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.metrics.fusion import METRICS

    parser.add_argument("--fused", type=Path, required=True, help="fused image, or a folder")
    parser.add_argument("--a", type=Path, required=True, help="source A (MRI), or a folder")
    parser.add_argument(
        "--b", type=Path, required=True, help="source B (CT/PET/SPECT), or a folder"
    )
    parser.add_argument(
        "--convention", default="standard", choices=_conventions(),
        help="which definitions to use (see the book's fusion-metrics appendix); default standard",
    )
    parser.add_argument(
        "--metrics", help=f"comma-separated subset (default: {','.join(METRICS)},MSE)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--csv", type=Path, help="folder mode: write one row per pair here")


def metrics_main(args: argparse.Namespace) -> int:
    """Fusion quality metrics (EN, SD, MI, PSNR, SF, Qabf, SSIM, VIF, SCD) of fused images.

    Give three files for one pair, or three folders (matched by file name) to score every pair;
    --csv writes the per-pair values in folder mode. Every output names its convention.
    """
    from fuse4seg.metrics.files import (
        check_pair_files,
        conventions_of,
        parse_metric_names,
        score_folder,
        score_pair,
        table_lines,
        write_csv,
    )
    from fuse4seg.metrics.fusion import nan_to_none
    from fuse4seg.utils import check_output_file

    conventions = conventions_of(args.convention)
    metrics = parse_metric_names(args.metrics)
    if args.csv is not None and args.fused.is_dir():
        check_output_file(args.csv, "--csv", [("--fused", args.fused), ("--a", args.a),
                                              ("--b", args.b)])
    if args.fused.is_dir():
        results = score_folder(args.fused, args.a, args.b, conventions, metrics)
        if args.csv is not None:
            write_csv(args.csv, results)
        if args.json:
            print(json.dumps(nan_to_none(results), indent=2))
        else:
            n = len(next(iter(results.values()))["per_pair"])
            means = {conv: res["mean"] for conv, res in results.items()}
            print("\n".join(table_lines(means, f"convention: {{conv}}; mean over {n} pairs "
                                                f"of {args.fused}")))
            print(f"wrote {args.csv}" if args.csv is not None
                  else "(the per-pair values: --csv FILE or --json)")
        return 0
    check_pair_files(args.fused, args.a, args.b)
    if args.csv is not None:
        raise ValueError("--csv is for folder mode (--fused FOLDER); use --json for one pair")
    results = score_pair(args.fused, args.a, args.b, conventions, metrics)
    if args.json:
        out = {"fused": str(args.fused), "a": str(args.a), "b": str(args.b), "metrics": results}
        print(json.dumps(nan_to_none(out), indent=2))
    else:
        header = f"convention: {{conv}}; fused {args.fused}; A {args.a}; B {args.b}"
        print("\n".join(table_lines(results, header)))
    return 0


# ============================================================================ wiring

COMMANDS: dict[tuple[str, ...], str] = {
    ("data", "phantom"): "phantom",
    ("data", "check"): "check",
    ("data", "prepare"): "prepare",
    ("train",): "train",
    ("evaluate",): "evaluate",
    ("predict",): "predict",
    ("study",): "study",
    ("metrics",): "metrics",
    ("fusion", "train"): "fusion_train",
    ("fusion", "evaluate"): "fusion_evaluate",
}
"""Verb path -> prefix of its ``<prefix>_arguments`` / ``<prefix>_main`` pair in this module."""

GROUP_HELP = {
    "data": "find, check, prepare BraTS data; make the built-in phantom",
    "fusion": "fusion-only training and evaluation on image pairs (Harvard, GFP-PC)",
}


def _resolve(prefix: str):
    module = sys.modules[__name__]
    return getattr(module, f"{prefix}_arguments"), getattr(module, f"{prefix}_main")


def _verb_in(argv: list[str]) -> tuple[str, ...] | None:
    """The registered verb path named by ``argv`` (``None`` when there is none yet)."""
    words = [w for w in argv if not w.startswith("-")][:2]
    for path in COMMANDS:
        if tuple(words[: len(path)]) == path:
            return path
    return None


def build_parser(only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; with ``only``, the options of that verb alone are added (the
    others are listed with their one-line help), so a call imports only what its verb needs.
    No verb's options import torch."""
    from fuse4seg import __version__

    parser = argparse.ArgumentParser(
        prog="fuse4seg",
        description="Fuse4Seg: image fusion for multi-modal medical segmentation "
        "via bi-level optimisation.",
    )
    parser.add_argument("--version", action="version", version=f"fuse4seg {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, prefix in COMMANDS.items():
        add_arguments, run = _resolve(prefix)
        doc = (run.__doc__ or "").strip().splitlines()
        # a verb's one-line help goes through argparse's %-formatting ("95 % intervals")
        help_text = doc[0].replace("%", "%%") if doc else None
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=run.__doc__)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUP_HELP.get(path[0]))
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=run.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        # also after the verb; SUPPRESS keeps a top-level --debug when this one is not given
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=DEBUG_HELP)
        if only is None or path == only:
            add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


DEBUG_HELP = "on an error, show Python's traceback, not only the one-line message"


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one ``fuse4seg: warning: ...`` line, without Python's file:line."""
    return f"fuse4seg: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_verb_in(argv) or ())
    args = parser.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("fuse4seg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, KeyError):
            message = str(exc.args[0])
        elif isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"  # not "[Errno 13] ...: 'path'"
        else:
            message = str(exc)
        print(f"fuse4seg: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
