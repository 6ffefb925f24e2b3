"""CLI verbs ``train``, ``evaluate`` and ``predict`` (wired in :mod:`fuse4seg.cli`).

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fuse4seg.config import parse_overrides
from fuse4seg.train.baselines import ABLATIONS, METHODS

__all__ = [
    "evaluate_arguments",
    "evaluate_main",
    "predict_arguments",
    "predict_main",
    "train_arguments",
    "train_main",
]


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="fuse4seg", choices=METHODS, help="what to train")
    parser.add_argument(
        "--ablation",
        choices=sorted(ABLATIONS),
        help="a Table 3 variant (sets the method and the loss switches): baseline, A, B, full",
    )
    parser.add_argument("--profile", default="default", help="smoke, default or paper")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="raw BraTS/phantom folder, or a prepared cache (a folder with manifest.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder")
    parser.add_argument("--cache", type=Path, help="where to prepare the cache of a raw folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--restart-if-code-changed",
        action="store_true",
        help="with --resume: start the run again when it was written by other fuse4seg code "
        "(default: warn and continue)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting, e.g. --set train.inner_steps=3 (repeatable)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 (default: the config's)")
    parser.add_argument(
        "--checkpoint-every-steps",
        type=int,
        metavar="N",
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
    from fuse4seg.config import get_config
    from fuse4seg.train.bilevel import dist_info, train

    config = get_config(args.profile, parse_overrides(args.set))
    result = train(
        config,
        method=args.method,
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
    import torch.distributed as dist

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
    parser.add_argument("--data", type=Path, required=True, help="raw folder or prepared cache")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--which", default="best", choices=["best", "ema", "last"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)


def evaluate_main(args: argparse.Namespace) -> int:
    """Dice/IoU per case and region of a run on a split, from the EMA leader.

    Whole volumes at the input's resolution (3-D counts per case); the split's patients come from
    the cache manifest the run was trained with.
    """
    from fuse4seg.train.inference import evaluate_run

    result = evaluate_run(
        args.run,
        args.data,
        split=args.split,
        json_out=args.json,
        which=args.which,
        device=args.device,
        batch_size=args.batch_size,
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
        "--mask", type=Path, help="brain mask NIfTI (default: where T1ce or FLAIR is non-zero)"
    )
    parser.add_argument("--which", default="best", choices=["best", "ema", "last"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)


def predict_main(args: argparse.Namespace) -> int:
    """Fuse and segment one case: writes fused.nii.gz and seg.nii.gz with the input's affine.

    Open them in ITK-SNAP or 3D Slicer. Labels are written in the input's scheme (BraTS 2021:
    ET = 4).
    """
    from fuse4seg.train.inference import predict_files

    written = predict_files(
        args.checkpoint,
        args.t1ce,
        args.flair,
        args.out,
        scheme=args.scheme,
        batch_size=args.batch_size,
        device=args.device,
        which=args.which,
        mask=args.mask,
    )
    for key in ("fused", "seg"):
        if written[key]:
            print(f"wrote {written[key]}")
    if written["fused"] is None:
        print("(a 2-channel method has no fused image)")
    print(f"labels ({written['scheme']} scheme): {written['label_counts']}")
    return 0
