"""The train step against an earlier commit, between processes (issue 9, part 1).

    python benchmarks/bench_against.py [--before 84ca131] [--arm NAME:VAR=VALUE,...]...
        [--triples 6] [--after-variant no_follower_ema] [-- BENCH_TRAIN_STEP_ARGS...]

Part 1's target is a ratio against the code before it (84ca131, where issue 9 was written).
Two processes of the same code differ by more than most levers (RESULTS.md, "Part 1 at the
issue's own size and models"), so one pair of runs says little. This script runs
``bench_train_step.py`` in fresh processes, in turns:

- **before**: ``--before`` (a commit, exported with ``git archive`` into a temporary folder,
  or a folder holding another checkout), its own ``bench_train_step.py`` and package, with
  ``--before-variant`` (default ``eager``);
- one process per ``--arm NAME:VAR=VALUE,...``: this checkout with those environment
  variables set (e.g. a lever's switch turned off);
- **after**: this checkout as it is, with ``--after-variant``. The default,
  ``no_follower_ema``, is the work 84ca131's ``eager`` did: the follower's weight average came
  later and is not part of the step being compared.

Each group of processes is one "triple" (or pair); every second group runs in the reverse
order, so that a drift of the machine's speed falls on every arm alike. Each process reports
the median of its timed calls; the table gives every process's value, their median per arm,
and for each arm the ratio of its median to the ``after`` median with the number of groups in
which ``after`` was the faster. The arguments after ``--`` go to every ``bench_train_step.py``
(default: the issue's size and models, 80×80, B 8, K 3, ``fuse4seg_small``,
``convnext_unet_small``, two rounds of five calls after two untimed ones, two threads).

Every process starts without the caller's ``FUSE4SEG_*`` variables, so ``after`` is the code
as shipped and an arm differs from it by its own variables only. The machine should be
otherwise idle; the table's caption gives the 1-minute load average at
the start and at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path("benchmarks") / "bench_train_step.py"
ISSUE_SIZE = ("--profile default --size 80 --batch 8 --inner-steps 3 --device cpu "
              "--fusion fuse4seg_small --segmentation convnext_unet_small --rounds 2 "
              "--repeats 5 --warmup 2 --threads 2").split()


@dataclass
class Arm:
    """One kind of process: a tree, a variant of ``bench_train_step.py``, and its environment."""

    name: str
    tree: Path
    variant: str
    env: dict[str, str] = field(default_factory=dict)
    outer: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:VAR=VALUE,VAR=VALUE`` → (NAME, {VAR: VALUE}); a clear error for anything else."""
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--arm {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE...]")
    env: dict[str, str] = {}
    for item in rest.split(","):
        var, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise ValueError(f"--arm {text!r}: {item!r} is not VAR=VALUE")
        env[var] = value
    return name, env


def step_times(output: str, variant: str) -> tuple[float, float]:
    """The outer and warm-up step (ms) of ``variant``'s row in ``bench_train_step``'s table."""
    for line in output.splitlines():
        if line.startswith(f"| {variant} |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            try:
                return float(cells[1].replace(",", "")), float(cells[4].replace(",", ""))
            except (IndexError, ValueError):
                raise ValueError(f"variant {variant!r} did not run: {line}") from None
    raise ValueError(f"no row for variant {variant!r} in:\n{output[-2000:]}")


def export(rev: str, into: Path) -> Path:
    """``git archive REV`` of this repository, unpacked into ``into``."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev],
                                 capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--before {rev!r}: git archive failed: "
                         f"{err.stderr.decode().strip()}") from None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_one(arm: Arm, bench_args: list[str]) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSE4SEG_")}
    env.update(PYTHONPATH=str(arm.tree), **arm.env)
    done = subprocess.run([sys.executable, str(SCRIPT), *bench_args, "--variants", arm.variant],
                          cwd=arm.tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{arm.name}: bench_train_step.py exited {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    try:
        return step_times(done.stdout, arm.variant)
    except ValueError as err:
        raise SystemExit(f"{arm.name}: {err}") from None


def table(arms: list[Arm]) -> str:
    """Per-process values, medians, and each arm's ratio to the last arm (``after``)."""
    after = arms[-1]
    lines = ["| arm | outer step (ms), per process | median | warm-up step (ms), per process "
             "| median |", "|---|---|---:|---|---:|"]
    for arm in arms:
        lines.append(
            f"| {arm.name} | {' · '.join(f'{t:.1f}' for t in arm.outer)} | "
            f"{statistics.median(arm.outer):.1f} | {' · '.join(f'{t:.1f}' for t in arm.warm)} | "
            f"{statistics.median(arm.warm):.1f} |")
    n = len(after.outer)
    for arm in arms[:-1]:
        ratios = []
        for mine, theirs in ((arm.outer, after.outer), (arm.warm, after.warm)):
            wins = sum(a > b for a, b in zip(mine, theirs, strict=True))
            ratio = statistics.median(mine) / statistics.median(theirs)
            ratios.append(f"**{ratio:.2f}×**, {after.name} faster in {wins} of {n}")
        lines.append(f"| {arm.name} / {after.name} | | {ratios[0]} | | {ratios[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, ISSUE_SIZE)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="84ca131",
                        help="a commit of this repository, or a folder with another checkout")
    parser.add_argument("--before-variant", default="eager")
    parser.add_argument("--after-variant", default="no_follower_ema")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME:VAR=VALUE,...",
                        help="this checkout with these environment variables (repeatable)")
    parser.add_argument("--triples", type=int, default=6, help="groups of processes")
    args = parser.parse_args(ours)
    if args.triples < 1:
        parser.error(f"--triples must be at least 1, got {args.triples}")
    try:
        middle = [parse_arm(text) for text in args.arm]
    except ValueError as err:
        parser.error(str(err))
    names = [name for name, _ in middle]
    clash = sorted({n for n in names if names.count(n) > 1 or n in ("before", "after")})
    if clash:
        parser.error(f"--arm names must differ from each other and from before/after: {clash}")
    with tempfile.TemporaryDirectory(prefix="bench_against_") as tmp:
        # absolute: each process runs in its tree, with the tree as its PYTHONPATH (a relative
        # path would make the child import this checkout's installed package instead)
        before = Path(args.before).resolve()
        if not before.is_dir():
            before = export(args.before, Path(tmp))
        if not (before / SCRIPT).is_file():
            parser.error(f"--before {args.before!r}: no {SCRIPT} in {before}")
        arms = [Arm("before", before, args.before_variant)]
        arms += [Arm(name, ROOT, args.after_variant, env) for name, env in middle]
        arms.append(Arm("after", ROOT, args.after_variant))
        load = os.getloadavg()[0]
        print(f"# bench_against: before = {args.before} ({args.before_variant}), after = this "
              f"checkout ({args.after_variant}); {args.triples} groups; bench_train_step.py "
              f"{' '.join(bench_args)}", flush=True)
        for group in range(args.triples):
            for arm in arms if group % 2 == 0 else arms[::-1]:
                outer, warm = run_one(arm, bench_args)
                arm.outer.append(outer)
                arm.warm.append(warm)
                print(f"# group {group + 1}, {arm.name}: outer {outer:.1f} ms, warm-up "
                      f"{warm:.1f} ms", flush=True)
    print(f"\n1-minute load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
          "end.\n")
    print(table(arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
