"""Mutation testing: show that named tests fail when the code they guard is broken on purpose.

Usage::

    python benchmarks/mutate.py FILE OLD NEW -- TEST [TEST ...]
    python benchmarks/mutate.py --catalogue [--only NAME ...]
    python benchmarks/mutate.py --list

Each mutation runs in a fresh copy of the working tree (the files ``git ls-files --cached
--others --exclude-standard`` lists) in a temporary folder: in FILE (relative to the repository
root) the text OLD, which must occur exactly once, is replaced by NEW, and ``python -m pytest -x
-q -p no:cacheprovider TEST ...`` runs in the copy with ``PYTHONPATH`` set to it. Python must
import the copy's package, not the editable install that points at the checkout: this is checked
before the tests run. The result is ``killed`` (pytest's exit status 1: a test failed),
``SURVIVED`` (0: every test passed) or ``error`` (any other status, e.g. a collection error, or
a timeout: not a kill).

First the tests run once on an unmutated copy (``--no-baseline`` skips it): a test that fails
without any mutation would make every kill meaningless.

``--catalogue`` runs the built-in :data:`CATALOGUE`, bugs that a review found the tests could
not catch and which tests were then added for, and prints a Markdown table (mutation, file,
test, result, seconds, the failing line). Exit status: 0 when every mutation is killed (or
survives where ``expected="survives"``), 1 when one survived or errored, 2 for a mutation that
cannot be applied or a failing baseline. The ad hoc form exits with 0 killed, 1 SURVIVED,
2 error. Progress goes to stderr. Run it niced on a shared machine (``nice -n 10``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "--tb=short")
"""pyproject.toml's addopts (``-ra --strict-markers``) hold no xdist option, so they stay."""

DEFAULT_TIMEOUT_S = 1200.0


class MutationError(Exception):
    """A mutation that cannot be applied, or a copy that does not import its own code."""


@dataclasses.dataclass(frozen=True)
class Mutation:
    """In ``file`` replace ``old`` (which occurs exactly once) by ``new``; ``tests`` must fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str
    expected: str = "killed"  # or "survives": a known gap, reported but not a failure


@dataclasses.dataclass(frozen=True)
class Outcome:
    result: str  # "killed", "SURVIVED" or "error"
    returncode: int | None  # None: pytest never finished (a timeout) or never ran (no compile)
    seconds: float
    output: str


_TRAIN = "tests/test_train.py::"
_STUDY = "tests/test_study.py::"

CATALOGUE: tuple[Mutation, ...] = (
    # --- the bugs of commit e2040a3's review ---------------------------------------------------
    Mutation(
        name="leader-xf-detached",
        file="fuse4seg/train/bilevel.py",
        old="logits = follower(x_fused)",
        new="logits = follower(x_fused.detach())",
        tests=(_TRAIN + "test_the_leader_learns_from_the_followers_loss",),
        why="L_lower|D_val no longer reaches the leader: Fuse4Seg becomes fusion-only training",
    ),
    Mutation(
        name="upper-seg-term-detached",
        file="fuse4seg/losses.py",
        old="total = seg_loss.float() + physical",
        new="total = seg_loss.float().detach() + physical",
        tests=(_TRAIN + "test_the_leader_learns_from_the_followers_loss",),
        why="Eq. 3 loses its segmentation gradient: the leader follows the physical terms alone",
    ),
    Mutation(
        name="validation-argmin",
        file="fuse4seg/train/validation.py",
        old="logits.argmax(dim=1)",
        new="logits.argmin(dim=1)",
        tests=(_TRAIN + "test_validation_dice_is_the_3d_dice_per_patient_computed_by_hand",),
        why="validation scores the least likely class: every logged Dice and best.pt are wrong",
    ),
    Mutation(
        name="best-keeps-the-worst",
        file="fuse4seg/train/trainer.py",
        old='row["val"]["mean_dice"] > self.best["mean_dice"]',
        new='row["val"]["mean_dice"] < self.best["mean_dice"]',
        tests=(_TRAIN + "test_best_pt_holds_the_epoch_with_the_highest_validation_dice",),
        why="best.pt, what predict and evaluate load by default, holds the worst epoch",
    ),
    Mutation(
        name="predict-flipped-x",
        file="fuse4seg/inference.py",
        old="seg = restore_volume(labels, shape, cfg, labels=True).astype(np.uint8)",
        new="seg = restore_volume(labels, shape, cfg, labels=True)[::-1].astype(np.uint8)",
        tests=("tests/test_predict.py::test_predict_puts_each_label_where_its_voxels_are",),
        why="seg.nii.gz mirrored left-right: plausible labels in the wrong hemisphere",
    ),
    Mutation(
        name="resume-loses-the-leader",
        file="fuse4seg/train/bilevel.py",
        old='self._frozen_xf = {}\n        for name, learner in (("follower", self.follower), '
        '("leader", self.leader)):',
        new='self._frozen_xf = {}\n        for name, learner in (("follower", self.follower),):',
        tests=(_TRAIN + "test_resume_after_sigkill_matches_an_uninterrupted_run",),
        why="a resumed run silently restarts the leader from its initial weights and optimiser",
    ),
    Mutation(
        name="bootstrap-80-for-95",
        file="fuse4seg/study.py",
        old="alpha = (1.0 - level) / 2.0",
        new="alpha = (1.0 - level) * 2.0",
        tests=(_STUDY + "test_the_bootstrap_interval_has_the_normal_width_by_hand",),
        why="a 95 % interval is an 80 % one: verdicts claim differences the data do not support",
    ),
    Mutation(
        name="bootstrap-seeds-fixed",
        file="fuse4seg/study.py",
        old="d[np.ix_(r, c)].mean()",
        new="d[:, c].mean()",
        tests=(_STUDY + "test_the_bootstrap_resamples_seeds_as_well_as_cases",),
        why="seed-to-seed training noise left out: intervals too narrow, false 'better' verdicts",
    ),
    # --- more that a demanding reviewer would want -------------------------------------------
    Mutation(
        name="dice-ignores-background",
        file="fuse4seg/losses.py",
        old="return 1 - (w * dice).sum() / c",
        new="return 1 - (w[1:] * dice[1:]).sum() / c",
        tests=("tests/test_losses.py::test_soft_dice_hand_value",),
        why="§3.5.1's weighted Dice without its background term: not the paper's L_lower",
    ),
    Mutation(
        name="ema-decay-ignored",
        file="fuse4seg/train/engine.py",
        old="decay = self.current_decay()",
        new="decay = 0.0",
        tests=(_TRAIN + "test_rollout_step_reuses_xf_and_freezes_the_follower",),
        why="the EMA leader of Eq. 4, what inference uses, is just the live leader",
    ),
    Mutation(
        name="leader-grads-not-cleared",
        file="fuse4seg/train/bilevel.py",
        old="lead.zero_grad()\n            lead.net.train()",
        new="lead.net.train()",
        tests=(_TRAIN + "test_the_leader_learns_from_the_followers_loss",),
        why="the leader's gradients pile up over updates and its cosine rate is never set",
    ),
    Mutation(
        name="follower-not-frozen",
        file="fuse4seg/train/bilevel.py",
        old="p.requires_grad_(False)",
        new="pass",
        tests=(_TRAIN + "test_rollout_step_reuses_xf_and_freezes_the_follower",),
        why="the leader's step writes gradients into the follower, which Algorithm 1 freezes",
    ),
    Mutation(
        name="sf-horizontal-twice",
        file="fuse4seg/metrics/fusion.py",
        old="cf2 = np.mean(np.square(np.diff(f, axis=0)))",
        new="cf2 = np.mean(np.square(np.diff(f, axis=1)))",
        tests=("tests/test_fusion_metrics.py::test_sd_and_sf_hand_values",),
        why="SF (Table 2) counts the row differences twice: scores unlike the literature's",
    ),
    Mutation(
        name="ddp-leader-not-reduced",
        file="fuse4seg/train/bilevel.py",
        old="leader = DDP(leader, device_ids=ids) if leader is not None else None",
        new="leader = leader",
        tests=("tests/test_ddp.py::test_torchrun_two_processes_gloo_smoke",),
        why="under torchrun each rank's leader learns from its own batches alone and the "
        "ranks part ways; rank 0 saves one of several leaders",
    ),
)


# --------------------------------------------------------------------------- the copy


def tracked_files(repo: Path) -> list[str]:
    """The working tree's files as git sees them: tracked, and untracked but not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def copy_tree(repo: Path, dest: Path) -> int:
    """Copy :func:`tracked_files` of ``repo`` into ``dest``; returns how many were copied.

    A tracked file deleted from the working tree is skipped (the copy is the working tree)."""
    count = 0
    for name in tracked_files(repo):
        src = repo / name
        if not (src.is_file() or src.is_symlink()):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        count += 1
    return count


def _text_with_one(root: Path, file: str, old: str) -> str:
    """The text of ``root / file``; :class:`MutationError` unless ``old`` occurs in it once."""
    path = root / file
    if not path.is_file():
        raise MutationError(f"{file}: no such file in {root}")
    text = path.read_text(encoding="utf-8")
    count = text.count(old)
    if count != 1:
        raise MutationError(
            f"{file}: the text {old!r} occurs {count} times (a mutation needs exactly one)"
        )
    return text


def apply_mutation(root: Path, file: str, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in ``root / file``; ``old`` must occur exactly once."""
    text = _text_with_one(root, file, old)
    (root / file).write_text(text.replace(old, new, 1), encoding="utf-8")


def check_mutation(repo: Path, mutation: Mutation) -> None:
    """Raise :class:`MutationError` (naming the mutation) unless ``mutation.old`` occurs once in
    ``repo``'s file."""
    try:
        _text_with_one(repo, mutation.file, mutation.old)
    except MutationError as exc:
        raise MutationError(f"{mutation.name}: {exc}") from None


def _module_of(root: Path, file: str) -> str | None:
    """The top-level import name ``file`` belongs to (``fuse4seg/x/y.py`` -> ``fuse4seg``), or
    ``None`` where it is no module (a test, a data file)."""
    parts = Path(file).parts
    if len(parts) == 1:
        return Path(file).stem if file.endswith(".py") and Path(file).stem.isidentifier() else None
    package = parts[0]
    return package if (root / package / "__init__.py").is_file() else None


def copy_env(root: Path) -> dict[str, str]:
    """The environment of the runs in the copy: its root first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # the shared data lie beside the checkout, not beside the copy: point the tests at them
    shared = REPO.parent / "shared" / "data"
    if "FUSE4SEG_SHARED_DATA" not in env and shared.is_dir():
        env["FUSE4SEG_SHARED_DATA"] = str(shared)
    return env


def check_imports_copy(root: Path, module: str) -> None:
    """Raise :class:`MutationError` unless ``import module`` in the copy finds the copy's code
    (an editable install of the checkout would otherwise win, and every mutation survive)."""
    code = (
        "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); "
        "print(s.origin if s else '')"
    )
    found = subprocess.run(  # -P: no current folder on sys.path, PYTHONPATH alone finds it
        [sys.executable, "-P", "-c", code, module],
        cwd=root,
        env=copy_env(root),
        capture_output=True,
        text=True,
    ).stdout.strip()
    real = Path(root).resolve()
    if not found or real not in Path(found).resolve().parents:
        raise MutationError(f"the copy in {root} imports {module} from {found or 'nowhere'}")


# --------------------------------------------------------------------------- running pytest


def run_pytest(root: Path, tests: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> Outcome:
    """``python -m pytest -x -q ...`` on ``tests`` in the copy at ``root``."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=copy_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a timeout ends its children too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        seconds = time.perf_counter() - start
        return Outcome("error", None, seconds, output + f"\n[timed out after {timeout:.0f} s]")
    seconds = time.perf_counter() - start
    code = proc.returncode
    result = {0: "SURVIVED", 1: "killed"}.get(code, "error")
    if result == "killed" and not_a_kill(output):
        result = "error"
    return Outcome(result, code, seconds, output)


_SUMMARY_ERRORS = re.compile(r"\b\d+ errors?\b")
_BROKEN = re.compile(r"^E\s+(SyntaxError|IndentationError|ImportError|ModuleNotFoundError|"
                     r"NameError)\b", re.M)


def not_a_kill(output: str) -> bool:
    """Whether pytest's exit status 1 came from something other than a failing assertion of
    a test: an error in a fixture's setup or teardown (pytest's summary counts those as
    "error"), or a mutation that broke the code itself where a test imports it late (a
    ``SyntaxError``, ``ImportError`` or ``NameError`` raised inside the test)."""
    summary = next((line for line in reversed(output.splitlines()) if " in " in line
                    and ("failed" in line or "error" in line)), "")
    return bool(_SUMMARY_ERRORS.search(summary) or _BROKEN.search(output))


def mutate_and_run(
    repo: Path,
    file: str,
    old: str,
    new: str,
    tests: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Outcome:
    """A fresh copy of ``repo``, one mutation (``old`` -> ``new`` in ``file``), the tests."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        root = Path(tmp)
        copy_tree(repo, root)
        apply_mutation(root, file, old, new)
        if file.endswith(".py"):  # a mutation that does not compile breaks, it kills nothing
            try:
                compile((root / file).read_text(encoding="utf-8"), file, "exec")
            except SyntaxError as exc:
                return Outcome("error", None, 0.0, f"E   SyntaxError: {exc}")
        module = _module_of(root, file)
        if module is not None:
            check_imports_copy(root, module)
        return run_pytest(root, tests, timeout)


def baseline(repo: Path, tests: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> Outcome:
    """The tests on an unmutated copy: they must pass for a kill to mean anything."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        root = Path(tmp)
        copy_tree(repo, root)
        return run_pytest(root, list(dict.fromkeys(tests)), timeout)


def baseline_passes(repo: Path, tests: Sequence[str], timeout: float) -> bool:
    """:func:`baseline`, with progress on stderr and, when it fails, pytest's output."""
    tests = list(dict.fromkeys(tests))
    _log(f"baseline: {len(tests)} test(s) on an unmutated copy ...")
    base = baseline(repo, tests, timeout)
    _log(f"  -> {'passed' if base.result == 'SURVIVED' else base.result} ({base.seconds:.1f} s)")
    if base.result != "SURVIVED":
        _log(base.output[-4000:])
        _log("the tests fail without any mutation: a kill would mean nothing")
    return base.result == "SURVIVED"


# --------------------------------------------------------------------------- reporting


_LOCATION = re.compile(r"^(\S+\.py):(\d+): in (\S+)$")


def failing_line(output: str) -> str:
    """From pytest's ``--tb=short`` output: the last test-file line of the failure and its
    first ``E`` line, e.g. ``test_x.py:12 assert f() == 2 — E assert 1 == 2``."""
    lines = output.splitlines()
    where, error = "", ""
    for i, line in enumerate(lines):
        m = _LOCATION.match(line)
        if m and Path(m.group(1)).name.startswith("test_") and i + 1 < len(lines):
            where = f"{Path(m.group(1)).name}:{m.group(2)} {lines[i + 1].strip()}"
        if not error and line.startswith("E "):
            error = line[1:].strip()
    if not error:  # e.g. a timeout, a crash without a traceback
        for line in reversed(lines):
            if line.strip():
                error = line.strip()
                break
    text = " — ".join(part for part in (where, error) if part)
    return text if len(text) <= 160 else text[:157] + "..."


def _skipped(output: str) -> str:
    m = re.search(r"(\d+) skipped", output)
    return f" ({m.group(1)} skipped)" if m else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[tuple[Mutation, Outcome]]) -> str:
    """The Markdown table of the catalogue's results."""
    out = [
        "| mutation | file | test | result | s | failing line |",
        "|---|---|---|---|---:|---|",
    ]
    for m, o in rows:
        tests = ", ".join(t.split("::")[-1] for t in m.tests)
        result = o.result
        if o.result == "SURVIVED":
            result += " (expected)" if m.expected == "survives" else ""
            result += _skipped(o.output)
        elif o.result == "error":
            if o.returncode is not None:
                result += f" (exit {o.returncode})"
            else:
                result += " (does not compile)" if "SyntaxError" in o.output else " (timeout)"
        detail = failing_line(o.output) if o.result != "SURVIVED" else ""
        cells = (
            f"`{m.name}`",
            f"`{m.file}`",
            f"`{tests}`",
            f"**{result}**",
            f"{o.seconds:.1f}",
            f"`{detail}`" if detail else "",
        )
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out)


def _ok(m: Mutation, o: Outcome) -> bool:
    return o.result == ("SURVIVED" if m.expected == "survives" else "killed")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the commands


def select(names: Sequence[str] | None) -> list[Mutation]:
    if not names:
        return list(CATALOGUE)
    known = {m.name: m for m in CATALOGUE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MutationError(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    return [known[n] for n in dict.fromkeys(names)]


def run_catalogue(
    repo: Path, mutations: Sequence[Mutation], timeout: float, with_baseline: bool = True
) -> int:
    for m in mutations:  # every one applies before any test runs
        check_mutation(repo, m)
    start = time.perf_counter()
    if with_baseline and not baseline_passes(repo, [t for m in mutations for t in m.tests],
                                             timeout):
        return 2
    rows = []
    for i, m in enumerate(mutations, 1):
        _log(f"[{i}/{len(mutations)}] {m.name}: {m.file} -> {', '.join(m.tests)}")
        outcome = mutate_and_run(repo, m.file, m.old, m.new, m.tests, timeout)
        _log(f"  -> {outcome.result} ({outcome.seconds:.1f} s)")
        rows.append((m, outcome))
    print(table(rows))
    total = time.perf_counter() - start
    bad = [m.name for m, o in rows if not _ok(m, o)]
    print(
        f"\n{len(rows) - len(bad)} of {len(rows)} as expected; total {total:.0f} s"
        + (f"; not killed: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


def list_catalogue() -> None:
    for m in CATALOGUE:
        note = "  [expected: survives]" if m.expected == "survives" else ""
        print(
            f"{m.name}{note}\n    {m.file}: {m.old!r} -> {m.new!r}\n    tests: "
            f"{', '.join(m.tests)}\n    why: {m.why}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tests: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tests = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="path relative to the repository root")
    parser.add_argument("old", nargs="?", help="text to replace (must occur exactly once)")
    parser.add_argument("new", nargs="?", help="its replacement")
    parser.add_argument("--catalogue", action="store_true", help="run the built-in catalogue")
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="with --catalogue: only these mutations",
    )
    parser.add_argument("--list", action="store_true", help="list the catalogue")
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository (default: this)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per pytest run (default %(default)s)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the tests on an unmutated copy"
    )
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:
        if args.list:
            list_catalogue()
            return 0
        if args.catalogue:
            if args.file is not None or tests:
                parser.error("--catalogue takes no FILE OLD NEW -- TEST")
            return run_catalogue(repo, select(args.only), args.timeout, not args.no_baseline)
        if args.new is None or not tests:
            parser.error("give FILE OLD NEW -- TEST [TEST ...], or --catalogue, or --list")
        _text_with_one(repo, args.file, args.old)
        if not args.no_baseline and not baseline_passes(repo, tests, args.timeout):
            return 2
        _log(f"mutation: {args.file}: {args.old!r} -> {args.new!r}; tests: {' '.join(tests)}")
        outcome = mutate_and_run(repo, args.file, args.old, args.new, tests, args.timeout)
    except MutationError as exc:
        print(f"mutate.py: error: {exc}", file=sys.stderr)
        return 2
    if outcome.result == "error":
        _log(outcome.output[-4000:])
    detail = failing_line(outcome.output) if outcome.result != "SURVIVED" else ""
    print(
        f"{outcome.result} ({outcome.seconds:.1f} s)"
        + (f": {detail}" if detail else "")
        + (_skipped(outcome.output) if outcome.result == "SURVIVED" else "")
    )
    return {"killed": 0, "SURVIVED": 1}.get(outcome.result, 2)


if __name__ == "__main__":
    sys.exit(main())
