"""A real-data study you can run here: k-fold cross-validation on a handful of real BraTS cases.

    python benchmarks/study_real.py --data ../shared/data/brats ../shared/data/brats2013 \\
        [--methods average disjoint_ae direct2ch fuse4seg] [--seeds 0 1 2] [--folds 3] \\
        [--profile default] [--runs runs/study_real] [--results benchmarks/RESULTS.md] \\
        [--threads N | --workers N] [--finished-only]

Every case folder found under the ``--data`` folders (any of the layouts
:func:`fuse4seg.data.find_cases` detects, mixed) is linked into ``--runs``/cases and prepared once.
The cases are dealt into ``--folds`` folds by a seeded permutation; in fold f the f-th group is
the test set, one of the other cases (rotating) the validation case, the rest train. Each
method is trained once per seed and fold with the profile (runs are kept under ``--runs`` and
reused, so an interrupted study resumes), its best checkpoint is scored on the fold's test
cases with :func:`fuse4seg.inference.evaluate_run` (3-D Dice per case at the input's
resolution; kept in the run folder by :func:`fuse4seg.study.evaluate_cached`), and so every
case is tested once per seed, by a model that never saw it.

Written: per method, the mean Dice over NCR, ED and ET per test case (mean over seeds) and the
per-class means ± sd over seeds; then the paired difference of ``fuse4seg`` against every
other method with :func:`fuse4seg.study.paired_difference` (a two-level bootstrap over test
cases and seeds) and its verdict. With ``--results``, the tables replace the section between
``<!-- study_real:begin -->`` and ``<!-- study_real:end -->`` of that file (appended when
absent), with the command and the machine. Slow (tens of minutes per seed on 2 cores): not
part of ``make test``.

``--workers 2`` trains every run of every fold two at a time, each in its own process on one
thread of a 2-core machine (:func:`fuse4seg.study.train_parallel`): one command for both
cores, and the same runs, bit for bit, as one process with ``--threads 1`` (checked on six
short runs: every logged loss equal).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- study_real:begin -->", "<!-- study_real:end -->"


def link_cases(folders: list[Path], into: Path) -> list[str]:
    """Link every case folder under ``folders`` into ``into``; returns the case ids.

    Every layout but MSD keeps a case in a folder of its own (:func:`fuse4seg.data.find.
    find_cases`), which is linked whole; an MSD folder's cases share ``imagesTr/`` and cannot
    be mixed this way (an error says so).
    """
    from fuse4seg.data.find import find_cases

    into.mkdir(parents=True, exist_ok=True)
    ids = []
    for folder in folders:
        for case in find_cases(folder):
            if case.layout == "msd":
                raise SystemExit(f"--data {folder}: an MSD folder (imagesTr/) cannot be mixed "
                                 "with other layouts here; give its cases as case folders")
            source = Path(next(p for p in case.paths.values() if p is not None)).parent
            target = into / source.name
            if target.exists():
                raise SystemExit(f"--data: two cases named {source.name}")
            target.symlink_to(source.resolve(), target_is_directory=True)
            ids.append(case.case_id)
    if len(ids) < 3:
        raise SystemExit(f"--data: found {len(ids)} cases; cross-validation needs at least 3")
    return sorted(ids)


def folds_of(cases: list[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """``k`` train/val/test splits; every case is in exactly one test set."""
    if not 2 <= k <= len(cases) - 2:
        raise SystemExit(f"--folds {k}: choose 2..{len(cases) - 2} for {len(cases)} cases")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    groups = [order[f::k] for f in range(k)]
    splits = []
    for f, test in enumerate(groups):
        rest = [c for c in order if c not in test]
        val = [rest[f % len(rest)]]
        splits.append({"train": sorted(c for c in rest if c not in val), "val": val,
                       "test": sorted(test)})
    return splits


def fold_cache(cache: Path, split: dict[str, list[str]], where: Path) -> Path:
    """A cache folder sharing ``cache``'s arrays with the manifest's split replaced."""
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["split"] = split
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "cases").exists():
        (where / "cases").symlink_to((cache / "cases").resolve(), target_is_directory=True)
    (where / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return where


def table(results, methods, seeds, cases, data_name, profile) -> list[str]:
    from fuse4seg.formatting import format_signed
    from fuse4seg.metrics.segmentation import tumour_mean
    from fuse4seg.study import paired_difference

    out = [f"Test Dice per case (mean over NCR, ED, ET; mean over seeds {seeds}); {data_name}; "
           f"profile `{profile}`; each case scored by the models of the fold that held it out.",
           "", "| method | " + " | ".join(cases) + " | mean | NCR | ED | ET |",
           "|---|" + "---|" * (len(cases) + 4)]
    for m in methods:
        per_seed = np.array([[tumour_mean(results[m][s][c]) for c in cases] for s in seeds])
        cells = [f"{v:.3f}" for v in per_seed.mean(axis=0)]
        means = per_seed.mean(axis=1)
        def sd(v):  # one seed has no sd
            return f" ± {v.std(ddof=1):.3f}" if len(seeds) > 1 else ""

        row = f"| `{m}` | " + " | ".join(cells) + f" | {means.mean():.3f}{sd(means)} |"
        for cls in ("NCR", "ED", "ET"):
            v = np.array([np.mean([results[m][s][c][cls]["dice"] for c in cases]) for s in seeds])
            row += f" {v.mean():.3f}{sd(v)} |"
        out.append(row)
    out += ["", "(± is the sd over seeds of the mean over cases.)" if len(seeds) > 1
            else "(One seed: no sd over seeds.)", ""]
    if "fuse4seg" in methods:
        out += ["| comparison | mean difference | 95 % interval | verdict |", "|---|---|---|---|"]
        for other in (m for m in methods if m != "fuse4seg"):
            diff = paired_difference(
                {s: {c: tumour_mean(results["fuse4seg"][s][c]) for c in cases} for s in seeds},
                {s: {c: tumour_mean(results[other][s][c]) for c in cases} for s in seeds},
                names=("Fuse4Seg", other),
            )
            out.append(f"| Fuse4Seg − {other} | {format_signed(diff['mean'])} | "
                       f"[{format_signed(diff['low'])}, {format_signed(diff['high'])}] | "
                       f"{diff['verdict']} |")
    return out


STAGE_METHODS = ("fuse4seg", "average")
"""The methods whose stage change :func:`stage_change` tabulates: Fuse4Seg and its own warm-up
prior, which switches to the same rollout schedule (K steps on D_tr at ``lr_follower_rollout``)
with no leader, so a fall they share is the schedule's, not the leader's."""


def stage_change(run_dirs: dict[str, dict[int, dict[int, Path]]], splits) -> list[str]:
    """Issue 10 part 1's targets at the stage change, on real cases: per fold and method
    (``run_dirs[method][fold][seed]``), over the seeds (:func:`fuse4seg.curves.rollout_targets`
    on whole runs)."""
    from fuse4seg.curves import curve, rollout_targets

    def fmt(values):
        return ", ".join(f"{v:.3f}" for v in values)

    def ratios(t):  # runs older than the same-slice reference have only the logged ratio
        return ", ".join(f"{r:.3f} ({g:.3f})" if same else f"– ({g:.3f})"
                         for r, g, same in zip(t["loss_ratio"], t["loss_ratio_logged"],
                                               t["same_slices"], strict=True))

    out = ["Stage change on the real folds (whole runs; a validation every `train.val_every` "
           "epochs on the fold's one validation case). Targets of issue 10 for `fuse4seg`: "
           "L_lower of the first rollout epoch within 1.15× that of the last warm-up epoch, and "
           "no rollout validation below the last warm-up validation by more than the seed sd "
           "of that warm-up validation. `average` switches to the same rollout schedule (K "
           "steps on D_tr, the rollout learning rate) without a leader: what it shares with "
           "`fuse4seg` comes from the schedule. The L_lower ratio compares the follower on the "
           "same D_tr slices before and after the stage change (`fuse4seg.curves."
           "rollout_targets`); in brackets the ratio of the two epochs' logged L_lower, which "
           "compares different batches.", "",
           "| fold | validation case | method | L_lower ratio, same slices (logged), per seed "
           "| drop per seed | sd of the last warm-up validation | ratio ≤ 1.15 | drop ≤ sd |",
           "|---|---|---|---|---|---|---|---|"]
    seen: set[tuple[int, ...]] = set()  # the seeds of each row, in their order
    folds = sorted({f for by_fold in run_dirs.values() for f in by_fold})
    for f in folds:
        for m in (m for m in STAGE_METHODS if f in run_dirs.get(m, {})):
            by_seed = run_dirs[m][f]
            seeds = sorted(by_seed)
            t = rollout_targets([curve(by_seed[s]) for s in seeds])
            if t is None:
                continue
            seen.add(tuple(seeds))
            sd = f"{t['sd_warm']:.3f}" if len(seeds) > 1 else "–"
            drop_ok, loss_ok = (
                "–" if t[k] is None else ("yes" if t[k] else "no") for k in ("drop_ok", "loss_ok"))
            out.append(f"| {f} | {', '.join(splits[f]['val'])} | `{m}` | "
                       f"{ratios(t)} | {fmt(t['drop'])} | {sd} | {loss_ok} | {drop_ok} |")
    if len(seen) == 1:
        order = f"Seeds {list(next(iter(seen)))} in that order"
    else:  # rows with different seeds: say so rather than name one row's
        order = "Seeds in increasing order within each row; the rows do not share one seed set"
    return out + ["", f"({order}; a negative drop is a rollout validation above the "
                      "warm-up's.)", ""]


def write_section(path: Path, lines: list[str]) -> None:
    text = path.read_text() if path.exists() else ""
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--methods", nargs="+",
                        default=["average", "disjoint_ae", "direct2ch", "fuse4seg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE overrides")
    parser.add_argument("--runs", type=Path, default=Path("runs/study_real"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: tabulate the finished runs under --runs; a fold "
                             "that lacks a finished run of some method and seed is left out "
                             "of every method's table (and named)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (two calls side by side, each on its own methods "
                             "with --threads 1, share 2 cores; a last call with every method "
                             "reuses their runs and writes the tables)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at a time, each in its own process on cores // N "
                             "threads (fuse4seg.study.train_parallel); 1: one after the other "
                             "in this process (--threads sets its threads)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fuse4seg.config import get_config, parse_overrides
    from fuse4seg.data.slices import prepare_cache
    from fuse4seg.study import train_one, train_parallel
    from fuse4seg.train.runs import cpu_name, data_checksum, finished_run, run_name

    config = get_config(args.profile, parse_overrides(args.set))
    started = time.perf_counter()
    results: dict[str, dict[int, dict[str, dict]]] = {m: {s: {} for s in args.seeds}
                                                      for m in args.methods}
    # The links stay under --runs: the cache's manifest names the files, and scoring reads them
    # (a temporary folder would vanish with the call that made it, under a second call's feet).
    cases_dir = args.runs / "cases"
    if cases_dir.exists():
        for link in cases_dir.iterdir():
            if link.is_symlink():
                link.unlink()
    cases = link_cases(args.data, cases_dir)
    cache = args.runs / f"cache-{config.profile}"
    prepare_cache(cases_dir, cache, config.data, progress=False)
    splits = folds_of(cases, args.folds)
    skipped = []
    jobs: list[dict] = []  # train_one's keyword arguments, one per run
    folds: list[int] = []  # the fold of each job
    stage_runs: dict[str, dict[int, dict[int, Path]]] = {}  # method -> fold -> seed -> run
    for f, split in enumerate(splits):
        data = fold_cache(cache, split, args.runs / f"fold{f}")
        out = args.runs / f"fold{f}" / "runs"
        if args.finished_only and not all(
            finished_run(out / run_name(
                get_config(args.profile, {**parse_overrides(args.set), "train.seed": s}),
                m, data_checksum(data)))
            for m in args.methods for s in args.seeds
        ):
            skipped.append(f)
            print(f"fold {f}: not every run is finished; left out", flush=True)
            continue
        for m in args.methods:
            for s in args.seeds:
                jobs.append({"config": config, "method": m, "data": data, "out": out,
                             "seed": s, "device": "cpu", "restart_if_code_changed": False})
                folds.append(f)

    def record(f: int, job: dict, done) -> None:
        m, s = job["method"], job["seed"]
        for case, scores in done.test["per_case"].items():
            results[m][s][case] = scores
        if m in STAGE_METHODS:
            stage_runs.setdefault(m, {}).setdefault(f, {})[s] = done.run_dir

    # each run's test scores are kept in its folder (test.json), so a gathering call scores
    # nothing; a gathering call (--finished-only) spawns no worker
    t0 = time.perf_counter()
    if args.workers > 1 and not args.finished_only:
        for f, job, done in zip(folds, jobs, train_parallel(jobs, args.workers), strict=True):
            record(f, job, done)
        print(f"{len(jobs)} runs, {args.workers} at a time: {time.perf_counter() - t0:.0f} s",
              flush=True)
    else:
        for f, job in zip(folds, jobs, strict=True):
            t0 = time.perf_counter()
            done = train_one(**job)
            record(f, job, done)
            print(f"fold {f} {job['method']} seed {job['seed']}: "
                  f"{time.perf_counter() - t0:.0f} s, test {sorted(done.test['per_case'])}",
                  flush=True)
    tested = [c for f, split in enumerate(splits) if f not in skipped for c in split["test"]]
    if not tested:
        raise SystemExit("no fold has every run finished")
    name = f"{len(cases)} real cases ({args.folds}-fold CV)"
    if skipped:
        name += (f"; folds {skipped} left out (unfinished), so {len(tested)} of the "
                 f"{len(cases)} cases are tested")
    lines = table(results, args.methods, args.seeds, tested, name, args.profile)
    if stage_runs:
        lines += ["", *stage_change(stage_runs, splits)]
    command = "python benchmarks/study_real.py " + shlex.join(sys.argv[1:])
    header = [f"Command: `{command}`; {time.perf_counter() - started:.0f} s in all on "
              f"{cpu_name()} ({os.cpu_count()} cores); folds (test cases): "
              + "; ".join(", ".join(s["test"]) for s in splits) + ".", ""]
    print("\n".join(header + lines))
    if args.results:
        write_section(args.results, ["## Real-data study (`study_real.py`, issue 10)", "",
                                     *header, *lines])


if __name__ == "__main__":
    main()
