"""The verbs that train and use segmentation runs: ``train``, ``evaluate``, ``predict`` and
``study``. Each imports torch when it runs, not when its options are added."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fuse4seg.cli.common import (
    PROFILES,
    add_set,
    config_of,
    given,
    positive_int,
    seed_int,
    write_json,
)


def train_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.train.methods import ABLATIONS, METHODS

    parser.add_argument("--method", choices=METHODS,
                        help="what to train (default: fuse4seg)")
    parser.add_argument(
        "--ablation", choices=sorted(ABLATIONS),
        help="a Table 3 variant (sets the method and the loss switches): baseline, A, B, full",
    )
    parser.add_argument("--profile", default="default", help=PROFILES)
    parser.add_argument(
        "--data", type=Path, required=True,
        help="raw BraTS/phantom folder, or a prepared cache (a folder with manifest.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="runs folder (default: runs)")
    parser.add_argument("--cache", type=Path, help="where to prepare the cache of a raw folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--restart-if-code-changed", action="store_true",
        help="with --resume: start the run again when it was written by other fuse4seg code "
        "(default: warn and continue)",
    )
    add_set(parser, "train.inner_steps=3", "train")
    parser.add_argument(
        "--seed", type=seed_int, metavar="N",
        help="train.seed: the initial weights, the batch order and the rollout splits "
        "(default: the profile's, 0); the same as --set train.seed=N",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    parser.add_argument(
        "--checkpoint-every-steps", type=positive_int, metavar="N",
        help="also write checkpoints/last.pt every N outer steps",
    )
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: one plain line per epoch instead (for log files)")


def train_main(args: argparse.Namespace) -> int:
    """Train a method (Algorithm 1, a baseline or an ablation) into RUNS/<method>-<profile>-<hash>.

    The run folder holds config.yaml, run.json (method, commit, data, its patient split),
    metrics.jsonl and checkpoints/{last,best,ema}.pt. With --resume an interrupted run continues
    from last.pt and ends exactly as an uninterrupted one would (CPU). Under `torchrun
    --nproc_per_node N -m fuse4seg train ...` it trains with DistributedDataParallel.
    """
    import torch.distributed as dist

    from fuse4seg.train.distributed import dist_info
    from fuse4seg.train.methods import check_ablation, check_method_settings, get_ablation
    from fuse4seg.train.trainer import train
    from fuse4seg.utils import check_output_folder

    if args.restart_if_code_changed and not args.resume:
        raise ValueError("--restart-if-code-changed decides what --resume does with a run of "
                         "other fuse4seg code: give it with --resume")
    check_output_folder(args.out, "--out")  # before the data is prepared or a network built
    method = get_ablation(args.ablation).method if args.ablation else args.method or "fuse4seg"

    def refuse(items: dict[str, tuple[str, Any]]) -> None:
        check_ablation(args.ablation, args.method, items)
        check_method_settings([method], items)

    config = config_of(
        args.profile, args.set, args._set_verb,
        {"--seed": ("train.seed", args.seed), "--device": ("train.device", args.device)},
        refuse=refuse,
    )
    result = train(
        config,
        method=method,
        data=args.data,
        out=args.out,
        cache=args.cache,
        resume=args.resume,
        restart_if_code_changed=args.restart_if_code_changed,
        checkpoint_every_steps=args.checkpoint_every_steps,
        progress=not args.no_progress,
        ablation=args.ablation,
        device=args.device,
        on_new_run=_no_run_to_resume,
        callback=epoch_line if args.no_progress else None,
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


def epoch_line(row: dict[str, Any]) -> None:
    """``train --no-progress``: one plain line per epoch on stderr, which a log file keeps
    readable (a progress bar writes carriage returns): the epoch, its stage, its mean losses,
    the validation's mean Dice where there was one, and the time so far."""
    losses = ", ".join(f"{k} {row[k]:.4f}" for k in ("L_lower", "L_upper", "L_physical")
                       if isinstance(row.get(k), float))
    val = row.get("val")
    dice = f", val mean Dice {val['mean_dice']:.4f}" if isinstance(val, dict) else ""
    print(f"epoch {row['epoch']} ({row['stage']}): {losses or 'no loss logged'}{dice}, "
          f"{row.get('elapsed_s', 0.0):.0f} s", file=sys.stderr, flush=True)


def _no_run_to_resume(run_dir: Path) -> None:
    """``train --resume`` that finds nothing to continue says so before it trains: a run
    folder's name hashes the settings, method and data, so a changed one names a new folder."""
    import sys

    why = ("holds no checkpoint yet" if run_dir.exists() else
           "does not exist: no run of these settings, method and data was started in "
           f"{run_dir.parent}")
    print(f"fuse4seg: --resume: {run_dir} {why}; training a new run",
          file=sys.stderr, flush=True)


def _bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the verbs that run a trained bundle (``evaluate``, ``predict``): which
    checkpoint, where, and how many slices per forward pass."""
    parser.add_argument("--which", choices=["best", "ema", "last"],
                        help="checkpoint of a run folder (default: best, else ema)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: 4 on a CPU, 16 on a GPU)")


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
    _bundle_arguments(parser)


def evaluate_main(args: argparse.Namespace) -> int:
    """Dice/IoU per case and region of a run on a split (its best checkpoint by default).

    Whole volumes at the input's resolution (3-D counts per case); the split's patients come from
    the cache's manifest: with the raw folder the run was trained on, that is the run's own
    cache, so ``test`` holds the patients it never trained on (a warning names the cases when
    the run trained on some of them: other data wants ``--split all``). A class absent from a
    case and not predicted there scores Dice = IoU = 1 in that case (the BraTS convention);
    absent but predicted, or present but missed, scores 0.
    """
    from fuse4seg.inference import evaluate_run
    from fuse4seg.utils import check_output_file
    if args.json is not None:
        check_output_file(args.json, "--json", given(args, "--data", "--cache"),
                          given(args, "RUN"))  # before minutes of scoring, not after
    result = evaluate_run(
        args.run, args.data, split=args.split, json_out=args.json, which=args.which,
        device=args.device, batch_size=args.batch_size, cache=args.cache, progress=True,
    )
    lines = [
        f"{result['method']} ({result['profile']}), "
        + ("all " if result["split"] == "all" else f"{result['split']} split, ")
        + f"{len(result['cases'])} case{'s' * (len(result['cases']) != 1)}, checkpoint "
        f"{result['checkpoint']}"
    ]
    for name, values in result["mean"].items():  # "mean": of NCR, ED and ET (the paper's)
        label = "mean (NCR, ED, ET)" if name == "mean" else name
        lines.append(f"  {label:>18}: Dice {values['dice']:.4f}  IoU {values['iou']:.4f}")
    if args.json is not None:
        lines.append(f"wrote {args.json}")
    print("\n".join(lines))
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
    _bundle_arguments(parser)


def predict_main(args: argparse.Namespace) -> int:
    """Fuse and segment one case: writes fused.nii.gz and seg.nii.gz with the input's affine.

    A two-channel method (direct2ch, monai_unet) fuses nothing and writes seg.nii.gz alone;
    it removes, and names, a fused.nii.gz another model left in --out.
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
    if written.get("removed"):
        print(f"removed {written['removed']} (an earlier model's fused image, which this "
              "2-channel method does not replace)")
    from fuse4seg.data.labels import CANONICAL_NAMES, EXPORT

    values = EXPORT[written["scheme"]]  # the value each class has in the written file
    print(f"labels in seg.nii.gz ({written['scheme']} scheme), voxels: " + ", ".join(
        f"{name} = {values[i]}: {written['label_counts'][name]}"
        for i, name in enumerate(CANONICAL_NAMES)))
    return 0


def study_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse4seg.train.methods import METHODS

    parser.add_argument(
        "--methods", nargs="+", default=["fuse4seg", "average"], choices=METHODS,
        help="methods to train (the first is compared with each of the others)",
    )
    parser.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2],
                        help="the train.seed of each run (default: 0 1 2)")
    parser.add_argument("--profile", default="default", help=PROFILES)
    parser.add_argument("--data", type=Path, required=True, help="raw folder or prepared cache")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="runs folder (default: runs)")
    add_set(parser, "train.rollout_epochs=20", "study")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    parser.add_argument("--json", type=Path, help="write per-seed, per-case scores here")


def _seeds_by_seeds(items: dict[str, tuple[str, Any]]) -> None:
    """``study`` refuses a ``--set`` of ``train.seed``: each run's seed comes from ``--seeds``,
    so the setting would change nothing."""
    if "train.seed" in items:
        raise ValueError(f"--set {items['train.seed'][0]}: a study trains one run per seed; "
                         "give the seeds with --seeds (e.g. --seeds 0 1 2)")


def study_main(args: argparse.Namespace) -> int:
    """Train methods over several seeds; per-case test Dice and paired 95 % intervals.

    Every method is trained once per seed on the same split (finished runs are reused) and
    scored on every test case; the first method is compared with each other one by the mean
    paired difference of per-case mean Dice, with a bootstrap interval over test cases and seeds.
    """
    from fuse4seg.study import run_study
    from fuse4seg.train.methods import check_method_settings
    from fuse4seg.utils import check_output_file

    def refuse(items: dict[str, tuple[str, Any]]) -> None:
        _seeds_by_seeds(items)
        check_method_settings(args.methods, items)

    config = config_of(args.profile, args.set, args._set_verb,
                       {"--device": ("train.device", args.device)}, refuse=refuse)
    if args.json is not None:
        check_output_file(args.json, "--json", given(args, "--data"))  # before any training
    report = run_study(config, args.methods, args.data, args.out, args.seeds, args.device,
                       echo=print)
    if args.json is not None:
        write_json(report, args.json)
    return 0
