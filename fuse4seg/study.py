"""Seeds and uncertainty: train a method over several seeds, score each test case, compare two
methods with a paired bootstrap interval.

One run is an anecdote: on two CPU cores the same configuration can land far apart, and a
phantom or a handful of real cases gives a few test patients. So every comparison in the book
goes through three functions:

- :func:`train_seeds` trains one method once per seed (``train.seed``: initial weights, batch
  order, rollout splits) on the same data split and scores every test case of every seed
  (:func:`fuse4seg.inference.evaluate_run`: 3-D Dice per case at the input's resolution);
- :func:`evaluate_cached` keeps that evaluation in the run folder (``test.json``), keyed by the
  code, the checkpoint and the data, so a reused run is not scored again;
- :func:`paired_difference` gives the mean difference of two methods' per-case mean Dice, paired
  by (seed, test case), with a 95 % bootstrap interval that resamples **test cases and seeds**
  (a two-level bootstrap: cases are the unit the claim is about, seeds the training noise), and
  one sentence saying what the interval supports.

Choices: the percentile bootstrap with 10,000 resamples and a fixed generator seed (the interval
is reproducible); seeds are paired across methods (seed s of method A against seed s of method
B: both see the same data split and draw the same batches, and each network's initial weights
come from its own seed (:func:`fuse4seg.train.bilevel.init_seed`), so methods that share a
network start it from the same weights; ``fuse4seg``'s warm-up is ``average``'s bit for bit, and
the pairing removes the luck of two initialisations from their difference); an interval that
contains 0 is reported as "not distinguishable at this scale", never as a tie or a win; with
fewer than :data:`MIN_CASES` test cases the difference is reported as descriptive only (a
bootstrap over 2 cases has 3 possible means and would look falsely precise).

Explained in chapter 4 (``book/04_bilevel_training.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fuse4seg.formatting import format_signed

__all__ = [
    "MIN_CASES",
    "NEGLIGIBLE_DICE",
    "SeedResult",
    "case_scores",
    "check_seeds",
    "evaluate_cached",
    "evaluation_key",
    "paired_difference",
    "run_study",
    "train_one",
    "train_parallel",
    "train_seeds",
    "verdict",
]


@dataclass
class SeedResult:
    """One seed of one method: the run folder, its best validation and its test scores."""

    method: str
    seed: int
    run_dir: Path
    best: dict[str, Any] | None
    test: dict[str, Any] | None  # evaluate_run's result (None when the split has no test case)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_case(self) -> dict[str, float]:
        """``{case: mean Dice over NCR, ED, ET}`` on the test split."""
        return case_scores(self.test) if self.test else {}


def case_scores(result: dict[str, Any], key: str = "dice") -> dict[str, float]:
    """``{case: mean over NCR, ED, ET of key}`` from :func:`fuse4seg.inference.evaluate_run`."""
    from fuse4seg.metrics.segmentation import tumour_mean

    return {case: tumour_mean(scores, key) for case, scores in result["per_case"].items()}


def train_seeds(
    config,
    method: str,
    data: str | Path,
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    ablation: str | None = None,
    device: str | None = None,
    progress: bool = False,
    restart_if_code_changed: bool = True,
) -> list[SeedResult]:
    """Train ``method`` (or a Table 3 ``ablation``) once per seed and score its test cases.

    Finished runs are reused (``resume=True``; a run folder made by other package code is
    trained again unless ``restart_if_code_changed`` is false), and so are their test scores
    (:func:`evaluate_cached`), so a second call trains and scores nothing.

    Returns:
        One :class:`SeedResult` per seed, in ``seeds`` order.

    Raises:
        ValueError: no seeds, a repeated seed, or a negative one.
    """
    return [train_one(config, method, data, out, seed, ablation=ablation, device=device,
                      progress=progress, restart_if_code_changed=restart_if_code_changed)
            for seed in check_seeds(seeds)]


def run_study(
    config,
    methods: Sequence[str],
    data: str | Path,
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    device: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``fuse4seg study``: train each of ``methods`` over ``seeds`` (:func:`train_seeds`, runs
    reused), score every test case, and compare the first method with each other one
    (:func:`paired_difference`).

    The split is checked before any training: a study scores test cases, so a split without
    one is refused at once rather than after hours of training.

    Args:
        echo: called with each line of the summary (per method, its test mean Dice per seed;
            then each comparison's verdict), e.g. ``print``.

    Returns:
        ``{"profile", "data", "seeds", "methods": {method: [{"seed", "run", "best_val",``
        ``"per_case"}]}, "comparisons": [{"a", "b", **paired_difference(...)}]}``.

    Raises:
        ValueError: repeated methods or seeds; an ``out`` that is a file or not writable; a
            split with no test case (the message gives the split's sizes); and what
            :func:`train_seeds` raises.
    """
    from fuse4seg.data.slices import load_manifest
    from fuse4seg.train.runs import resolve_cache
    from fuse4seg.utils import check_output_folder

    echo = echo or (lambda line: None)
    methods = list(methods)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {' '.join(methods)}: give distinct methods (the first is "
                         "compared with each other one)")
    seeds = check_seeds(seeds, "--seeds")  # before the cache is prepared
    check_output_folder(out, "--out")
    # resolved once: the runs train on this cache, and a raw folder's sources are not
    # checked again for every method and seed
    cache = resolve_cache(data, config, runs_dir=out)
    split = load_manifest(cache)["split"]
    if not split.get("test"):
        raise ValueError(
            f"--data {data}: its split has no test case "
            f"({ {k: len(v) for k, v in split.items()} }); a study scores test cases: give "
            "more cases or other data.split_fractions (--set data.split_fractions=...)"
        )
    results = {m: train_seeds(config, m, cache, out, seeds, device=device, progress=True)
               for m in methods}
    report: dict[str, Any] = {"profile": config.profile, "data": str(data),
                              "seeds": list(seeds), "methods": {}, "comparisons": []}
    for method, runs in results.items():
        report["methods"][method] = [
            {"seed": r.seed, "run": r.run_dir.name, "best_val": r.best, "per_case": r.per_case}
            for r in runs
        ]
        means = [float(sum(r.per_case.values()) / len(r.per_case)) for r in runs if r.per_case]
        echo(f"{method}: test mean Dice per seed "
             + (", ".join(f"{v:.3f}" for v in means) or "no test cases"))
    first = methods[0]
    for other in methods[1:]:
        a = {r.seed: r.per_case for r in results[first]}
        b = {r.seed: r.per_case for r in results[other]}
        if not all(a.values()):
            break
        diff = paired_difference(a, b, names=(first, other))
        report["comparisons"].append({"a": first, "b": other, **diff})
        echo(diff["verdict"])
    return report


def check_seeds(seeds: Sequence[int], what: str = "seeds") -> list[int]:
    """``seeds`` as a list of ints (``what`` names them in the error, e.g. ``--seeds``).

    Raises:
        ValueError: no seeds, a repeated seed, or a negative one.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{what}: give distinct seeds, got {seeds}")
    if min(seeds) < 0:
        raise ValueError(f"{what}: seeds must be >= 0, got {seeds}")
    return seeds


def train_one(
    config,
    method: str,
    data: str | Path,
    out: str | Path,
    seed: int,
    ablation: str | None = None,
    device: str | None = None,
    progress: bool = False,
    restart_if_code_changed: bool = True,
) -> SeedResult:
    """One seed of :func:`train_seeds`: train (or reuse) the run and score its test cases."""
    from fuse4seg.config import get_config
    from fuse4seg.train.runs import flatten
    from fuse4seg.train.trainer import train

    cfg = get_config(config.profile, {**flatten(config), "train.seed": int(seed)})
    run = train(
        cfg, method, data=data, out=out, resume=True, progress=progress, ablation=ablation,
        device=device, restart_if_code_changed=restart_if_code_changed,
    )
    test = None
    try:
        # scored where it trained: --device, else train.device (a --set of it included)
        test = evaluate_cached(run.run_dir, data, split="test", device=device or cfg.train.device)
    except ValueError as exc:  # no test case in this split
        if "no cases" not in str(exc):
            raise
    name = method if ablation is None else f"ablation {ablation}"
    return SeedResult(name, int(seed), run.run_dir, run.best, test)


def _set_threads(threads: int) -> None:  # a worker's initializer
    import torch

    torch.set_num_threads(threads)


def train_parallel(jobs: Sequence[dict[str, Any]], workers: int = 1) -> list[SeedResult]:
    """:func:`train_one` for each job (its keyword arguments), ``workers`` at a time.

    With ``workers > 1`` every job runs in its own spawned process with ``cores // workers``
    torch threads (at least 1), and the results come back in the order of ``jobs``. On a CPU
    two small runs side by side on one thread each train faster together than one after the
    other on two threads (``benchmarks/RESULTS.md``: 1.57× the outer steps per second of the
    ``default`` profile on 2 cores), because an op of these sizes does not keep two threads
    busy. A run's numbers depend on its thread count (the float sums are split differently),
    so a run trained here is not bit-identical to one trained alone on more threads; a
    finished run is reused either way. ``workers <= 1`` trains in this process, one job after
    the other. Use one worker per GPU, not more.

    Raises:
        ValueError: a job without ``config``, ``method``, ``data``, ``out`` or ``seed``.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    needed = {"config", "method", "data", "out", "seed"}
    for job in jobs:
        if not needed <= set(job):
            raise ValueError(f"train_parallel: a job needs {sorted(needed)}, got {sorted(job)}")
    if workers <= 1:
        return [train_one(**job) for job in jobs]
    if not jobs:
        return []
    # a lone job goes to a worker too: its thread count, and so its numbers, must not depend
    # on how many jobs came with it
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(train_one, **job) for job in jobs]
        return [f.result() for f in futures]


def evaluation_key(run_dir: str | Path, data: str | Path, split: str = "test",
                   which: str = "best") -> dict[str, Any]:
    """What an evaluation of a run depends on, as :func:`evaluate_cached` stores it.

    ``code``: this package's :func:`~fuse4seg.utils.code_digest` (the evaluation code; a run
    trained by other code is also retrained by ``train_seeds``, which empties its folder);
    ``checkpoint``: the name and SHA-256 of the checkpoint scored (a run that trained on
    changes it); ``data``: the data folder and its
    :func:`~fuse4seg.train.runs.data_checksum` (cases, split, settings, source checksums) when
    it is a cache, else the run's recorded one;
    ``split`` and ``which``.
    """
    from fuse4seg.inference import _checkpoint_path
    from fuse4seg.train.runs import data_checksum, read_run_json
    from fuse4seg.utils import code_digest, file_sha256

    run_dir, data = Path(run_dir), Path(data)
    checkpoint = _checkpoint_path(run_dir, which)
    if (data / "manifest.json").is_file():
        checksum = data_checksum(data)
    else:
        checksum = read_run_json(run_dir).get("data_checksum")
    return {
        "code": code_digest(),
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "data": str(data.resolve()),
        "data_checksum": checksum,
        "split": split,
        "which": which,
    }


def evaluate_cached(run_dir: str | Path, data: str | Path, split: str = "test",
                    device: str = "auto", which: str = "best") -> dict[str, Any]:
    """:func:`fuse4seg.inference.evaluate_run` of a run folder, kept in ``RUN/<split>.json``.

    The file holds ``{"key": evaluation_key(...), "result": ...}``; it is reused only when its
    key equals the key of this call (same code, same checkpoint bytes, same data, split and
    checkpoint choice), otherwise the run is scored again and the file rewritten (atomically).
    The device is not part of the key: it changes scores by float noise only.

    Raises:
        ValueError: as :func:`~fuse4seg.inference.evaluate_run` (e.g. a split with no cases).
    """
    import json

    from fuse4seg.inference import evaluate_run
    from fuse4seg.utils import atomic_write_json

    run_dir = Path(run_dir)
    key = evaluation_key(run_dir, data, split, which)
    path = run_dir / f"{split}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    result = evaluate_run(run_dir, data, split=split, which=which, device=device)
    atomic_write_json(path, {"key": key, "result": result})
    return result


def paired_difference(
    a: Sequence[dict[str, float]] | dict[int, dict[str, float]],
    b: Sequence[dict[str, float]] | dict[int, dict[str, float]],
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, Any]:
    """Mean of A − B over (seed, test case) pairs with a two-level bootstrap interval.

    Args:
        a, b: per seed, ``{case: score}`` (e.g. :attr:`SeedResult.per_case`); a list (seeds in
            order) or ``{seed: {case: score}}``. Both must hold the same seeds and cases.
        n_boot: bootstrap resamples.
        level: the interval's coverage.
        seed: the bootstrap generator's seed.
        names: how the verdict names A and B.

    Returns:
        ``{"mean", "low", "high", "level", "n_seeds", "n_cases", "differences" (seeds × cases),
        "verdict"}``. With one case and one seed the interval is the point itself.

    Raises:
        ValueError: seeds or cases that do not match.
    """
    a_map = dict(enumerate(a)) if not isinstance(a, dict) else dict(a)
    b_map = dict(enumerate(b)) if not isinstance(b, dict) else dict(b)
    if sorted(a_map) != sorted(b_map) or not a_map:
        raise ValueError(f"paired_difference: seeds differ ({sorted(a_map)} vs {sorted(b_map)})")
    seeds = sorted(a_map)
    cases = sorted(a_map[seeds[0]])
    for s in seeds:
        if sorted(a_map[s]) != cases or sorted(b_map[s]) != cases:
            raise ValueError(f"paired_difference: the test cases of seed {s} differ")
    if not cases:
        raise ValueError("paired_difference: no test cases")
    d = np.array([[a_map[s][c] - b_map[s][c] for c in cases] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_s, n_c = d.shape
    rows = rng.integers(0, n_s, size=(n_boot, n_s))  # resampled seeds
    cols = rng.integers(0, n_c, size=(n_boot, n_c))  # resampled cases
    boot = np.array([d[np.ix_(r, c)].mean() for r, c in zip(rows, cols, strict=True)])
    alpha = (1.0 - level) / 2.0
    low, high = (float(q) for q in np.quantile(boot, [alpha, 1.0 - alpha]))
    mean = float(d.mean())
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "level": level,
        "n_seeds": n_s,
        "n_cases": n_c,
        "differences": d.tolist(),
        "verdict": verdict(mean, low, high, level, names, n_s, n_c),
    }


def _smallest_table1_gap() -> float:
    """The smallest gap between two distinct mean Dice of the paper's Table 1 (0.004)."""
    from fuse4seg.paper import TABLE1

    means = sorted({row["mean"][0] for row in TABLE1.values()})
    return round(min(b - a for a, b in zip(means, means[1:], strict=False)), 6)


NEGLIGIBLE_DICE = _smallest_table1_gap()
"""A paired difference of mean Dice whose whole interval is smaller than this is negligible
(:func:`verdict`): 0.004, the smallest gap the paper's Table 1 reports between two methods
(nnU-Net 0.872 against transU-Net 0.868), so smaller than any difference the paper ranks
methods by. The paper gives no such margin; we take the resolution of its own table."""

MIN_CASES = 5
"""Fewer test cases than this and the bootstrap cannot stand for the spread of the population
(with 2 cases it has 3 distinct means): the verdict then reports the difference as descriptive
only, whatever the interval."""


def verdict(mean, low, high, level, names=("A", "B"), n_seeds=None, n_cases=None,
            negligible: float = NEGLIGIBLE_DICE) -> str:
    """One sentence saying what a paired interval supports (and nothing more).

    An interval that lies wholly within ±``negligible`` (default :data:`NEGLIGIBLE_DICE`, the
    smallest gap between two methods' mean Dice in the paper's Table 1) is called negligible
    whichever side of 0 it lies on: a difference that excludes 0 is then "a difference, but a
    negligible one", and one that holds 0 is "equal in practice". The sentence names where the
    margin comes from: the paper's Table 1 for the default, "the caller's margin" for any other
    value. ``negligible=0`` turns this off; a negative margin is an error.
    """
    if not negligible >= 0:  # also refuses NaN
        raise ValueError(f"verdict: negligible must be a margin >= 0 in mean Dice, "
                         f"got {negligible!r}")
    a, b = names
    size = (
        f" ({n_cases} test case{'s' * (n_cases != 1)} × {n_seeds} seed{'s' * (n_seeds != 1)})"
        if n_seeds is not None and n_cases is not None
        else ""
    )
    span = (f"{a} − {b} = {format_signed(mean)} mean Dice, {level:.0%} interval "
            f"[{format_signed(low)}, {format_signed(high)}]")
    if n_cases is not None and n_cases < MIN_CASES:
        return (
            f"{span}{size}: with fewer than {MIN_CASES} test cases the interval does not measure "
            f"the uncertainty, so this difference is descriptive only and supports no claim."
        )
    one_run = (
        " With one seed the interval covers the test cases, not the training runs: another seed"
        " may change the sign, so this is no evidence that one method trains better."
        if n_seeds == 1
        else ""
    )
    within = max(abs(low), abs(high)) < negligible
    source = ("the smallest gap between two methods' mean Dice in the paper's Table 1"
              if negligible == NEGLIGIBLE_DICE else "the caller's margin")
    if low > 0 or high < 0:
        side = "higher" if low > 0 else "lower"
        if within:
            return (f"{span}{size}: {a} scores {side} than {b} on this data, but by less than "
                    f"{negligible:g} ({source}): a difference, but a negligible one.{one_run}")
        return f"{span}{size}: {a} scores {side} than {b} on this data.{one_run}"
    if within:
        caveat = (" With one seed the interval covers the test cases, not the training runs, so"
                  " this does not show that the two train equally well." if n_seeds == 1 else "")
        return (f"{span}{size}: the interval contains 0 and every value in it is under "
                f"{negligible:g} in size ({source}), so {a} and {b} are equal in practice at "
                f"this scale.{caveat}")
    return f"{span}{size}: the interval contains 0, so {a} and {b} are not distinguishable at " \
        "this scale."
