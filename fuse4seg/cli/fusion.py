"""The verbs of image fusion on its own: ``fusion train``, ``fusion evaluate`` and ``metrics``
(``metrics`` never imports torch: ``tests/test_cli.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fuse4seg.cli.common import (
    PAIR_KINDS,
    PROFILES,
    add_json,
    add_set,
    config_of,
    crop_int,
    given,
    positive_float,
    positive_int,
    seed_int,
    write_json,
)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", type=Path, required=True,
        help="Harvard folder (holding PET-MRI/, ...) or the GFP folder (GFP/, PC/)",
    )
    parser.add_argument("--kind", required=True, choices=PAIR_KINDS,
                        help="which pairs: a Harvard kind (KIND/train/) or GFP-PC")
    parser.add_argument("--only", help="comma-separated pair names to use (default: all)")
    parser.add_argument("--exclude", help="comma-separated pair names to leave out")
    parser.add_argument("--max-pairs", type=positive_int,
                        help="use at most N pairs (sorted by name)")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N (default: the config's)")


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
    parser.add_argument("--profile", default="default", help=PROFILES)
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="runs folder (default: runs)")
    parser.add_argument("--steps", type=positive_int, help="leader updates (default: fusion.steps)")
    parser.add_argument("--crop", type=crop_int, help="crop side (default: fusion.crop)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="crops per step (default: fusion.batch)")
    parser.add_argument("--lr", type=positive_float,
                        help="base learning rate (default: fusion.lr)")
    parser.add_argument("--seed", type=seed_int,
                        help="seed of the crops and initial weights (default: train.seed)")
    add_set(parser, "loss.beta_grad=2", "fusion train")
    parser.add_argument("--force", action="store_true", help="retrain even if the run exists")
    parser.add_argument(
        "--restart-if-code-changed", action="store_true",
        help="train a finished run again when it was written by other fuse4seg code (default: "
        "reuse it with a warning, as `train --resume` does)",
    )


def fusion_train_main(args: argparse.Namespace) -> int:
    """Train the fusion leader on image pairs with the physical losses only (no labels).

    Writes RUNS/fusion-<kind>-<profile>-<hash>/ (config, run.json, metrics.jsonl,
    checkpoints/leader.pt) and prints its path; a finished run with the same settings is reused
    (one written by other fuse4seg code with a warning, or trained again with
    ``--restart-if-code-changed``).
    """
    from fuse4seg.train.fusion_only import train_fusion
    from fuse4seg.utils import check_output_folder

    if args.kind == "GFP-PC" and args.split != "train":
        raise ValueError("--split: GFP-PC has a single set; choose pairs with --only/--exclude")
    options = {flag: (FLAG_SETTINGS[flag], value) for flag, value in given(args, *FLAG_SETTINGS)}
    config = config_of(args.profile, args.set, args._set_verb, options)
    check_output_folder(args.out, "--out")
    pairs = _load_pairs(args, args.split)
    run = train_fusion(pairs, config, args.out, args.kind, force=args.force, progress=True,
                       reuse_other_code=not args.restart_if_code_changed)
    last = run.history[-1] if run.history else {}
    state = "reused" if run.reused else "trained"
    print(
        f"{state} {run.run_dir} on {len(pairs)} {args.kind} pairs; last logged loss: "
        f"{last.get('total', float('nan')):.4g}"
    )
    return 0


FLAG_SETTINGS = {
    "--steps": "fusion.steps", "--crop": "fusion.crop", "--batch-size": "fusion.batch",
    "--lr": "fusion.lr", "--seed": "train.seed", "--device": "train.device",
}
"""The setting each option of ``fusion train`` gives: :func:`fuse4seg.cli.common.config_of`
applies the options given to the config, so the run's ``config.yaml`` (and its folder's hash)
is the same whether a value came as ``--steps 3`` or ``--set fusion.steps=3``, and refuses the
two together where they disagree."""


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
    parser.add_argument(
        "--convention", default="standard", choices=_conventions(),
        help="which definitions to use (see the book's fusion-metrics appendix); default standard",
    )
    parser.add_argument("--json", type=Path, help="write the metrics (per pair and mean) here")
    parser.add_argument("--images", type=Path, help="write fused grey and colour PNGs here")


def fusion_evaluate_main(args: argparse.Namespace) -> int:
    """Fuse a split's pairs (default: test) with a trained leader or a rule, and score them.

    Prints the mean of every metric under the chosen convention(s); --json writes per-pair and
    mean values, --images the fused Y and colour PNGs.
    """
    from fuse4seg.fusion_baselines import BASELINES
    from fuse4seg.metrics.files import conventions_of, table_lines
    from fuse4seg.metrics.fusion import nan_to_none
    from fuse4seg.train.fusion_only import (
        evaluate_fusion,
        load_fusion_leader,
        pairs_trained_on,
    )
    from fuse4seg.utils import check_output_file, check_output_folder

    conventions = conventions_of(args.convention)
    run = None if args.method in BASELINES else args.method
    if args.json is not None:
        check_output_file(args.json, "--json", given(args, "--pairs"), [("METHOD", run)])
    if args.images is not None:  # before any pair is fused
        check_output_folder(args.images, "--images", given(args, "--pairs"), [("METHOD", run)])
    if args.kind == "GFP-PC" and args.split is not None:
        raise ValueError(f"--split {args.split}: GFP-PC has a single set, scored whole; choose "
                         "pairs with --only/--exclude")
    if args.device is not None:  # checked even where a rule fuses on the CPU and ignores it
        from fuse4seg.utils import resolve_device

        resolve_device(args.device)
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
    seen = pairs_trained_on(source, pairs) if source is not None else []
    if seen:  # GFP-PC is scored whole; Harvard's --split train is the leader's own
        import warnings

        shown = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
        warnings.warn(
            f"{len(seen)} of the {len(pairs)} pairs scored are pairs {args.method} trained on "
            f"({shown}; its run.json's train_pairs), so their scores are not held-out "
            "scores: leave them out with --exclude, or score held-out pairs with --only",
            stacklevel=2)
    result = evaluate_fusion(
        pairs, label if leader is None else "leader", leader, conventions, args.images
    )
    out = {
        "method": label, "leader": source, "kind": args.kind, "split": split,
        "data": str(args.pairs), "trained_on": seen, "pairs": result["pairs"],
        "metrics": result["metrics"],
    }
    means = {conv: res["mean"] for conv, res in result["metrics"].items()}
    header = f"{label} on {len(pairs)} {args.kind} {split} pairs of {args.pairs}; "
    header += "convention: {conv}"
    print("\n".join(table_lines(means, header)))
    if args.json is not None:
        write_json(nan_to_none(out), args.json)
    if args.images is not None:
        print(f"wrote the fused images to {args.images}")
    return 0


def metrics_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.metrics.fusion import METRICS

    parser.add_argument("--fused", type=Path, required=True,
                        help="fused 2-D image (PNG, JPEG, TIFF; not a NIfTI volume), or a folder")
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
    add_json(parser, "the metrics (folder mode: per pair and mean)")
    parser.add_argument("--csv", type=Path, help="folder mode: write one row per pair here")


def metrics_main(args: argparse.Namespace) -> int:
    """Fusion quality metrics of fused images: EN, SD, MI, PSNR, SF, Qabf, SSIM, VIF, SCD, MSE.

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
    metrics = parse_metric_names(args.metrics, conventions)
    inputs = given(args, "--fused", "--a", "--b")
    if (args.csv is not None and args.json not in (None, "-")
            and Path(args.csv).resolve() == Path(args.json).resolve()):
        raise ValueError(f"--csv and --json both name {args.csv}: give two files (or drop one)")
    if args.csv is not None and args.fused.is_dir():
        check_output_file(args.csv, "--csv", inputs)
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json", inputs)
    if args.fused.is_dir():
        results = score_folder(args.fused, args.a, args.b, conventions, metrics)
        if args.csv is not None:
            write_csv(args.csv, results)
        if args.json != "-":
            n = len(next(iter(results.values()))["per_pair"])
            means = {conv: res["mean"] for conv, res in results.items()}
            print("\n".join(table_lines(means, f"convention: {{conv}}; mean over {n} pairs "
                                                f"of {args.fused}")))
            if args.csv is not None:
                print(f"wrote {args.csv}")
            elif args.json is None:
                print("(the per-pair values: --csv FILE or --json [FILE])")
        if args.json is not None:
            write_json(nan_to_none(results), args.json)
        return 0
    check_pair_files(args.fused, args.a, args.b)
    if args.csv is not None:
        raise ValueError("--csv is for folder mode (--fused FOLDER); use --json for one pair")
    results = score_pair(args.fused, args.a, args.b, conventions, metrics)
    if args.json != "-":
        header = f"convention: {{conv}}; fused {args.fused}; A {args.a}; B {args.b}"
        print("\n".join(table_lines(results, header)))
    if args.json is not None:
        out = {"fused": str(args.fused), "a": str(args.a), "b": str(args.b), "metrics": results}
        write_json(nan_to_none(out), args.json)
    return 0
