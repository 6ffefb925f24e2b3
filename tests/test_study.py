"""Seeds and uncertainty: the paired bootstrap by hand, and training over seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse4seg.formatting import format_signed
from fuse4seg.study import paired_difference, verdict


def test_a_constant_difference_has_a_point_interval():
    cases = [f"c{i}" for i in range(5)]
    a = [{c: 0.7 - 0.01 * i for i, c in enumerate(cases)}, {c: 0.6 for c in cases}]
    b = [{c: v - 0.2 for c, v in s.items()} for s in a]
    d = paired_difference(a, b, n_boot=200, names=("X", "Y"))
    assert d["mean"] == pytest.approx(0.2)
    assert d["low"] == pytest.approx(0.2) and d["high"] == pytest.approx(0.2)
    assert d["n_seeds"] == 2 and d["n_cases"] == 5
    assert "X scores higher than Y" in d["verdict"]
    assert "another seed" not in d["verdict"]  # two seeds: no one-run caveat


def test_one_seed_says_its_interval_covers_test_cases_only():
    cases = [f"c{i}" for i in range(6)]
    a = [{c: 0.7 - 0.01 * i for i, c in enumerate(cases)}]
    b = [{c: v - 0.1 for c, v in a[0].items()}]
    d = paired_difference(a, b, n_boot=200, names=("X", "Y"))
    assert "X scores higher than Y" in d["verdict"]
    assert "not the training runs" in d["verdict"] and "another seed" in d["verdict"]
    d = paired_difference(b, a, n_boot=200, names=("Y", "X"))
    assert "Y scores lower than X" in d["verdict"] and "another seed" in d["verdict"]


def test_too_few_cases_support_no_claim():
    a = [{"c1": 0.7, "c2": 0.5}]
    b = [{"c1": 0.1, "c2": 0.1}]
    d = paired_difference(a, b, n_boot=200, names=("X", "Y"))
    assert d["low"] > 0  # the bootstrap alone would call it a win
    assert "descriptive only" in d["verdict"] and "higher" not in d["verdict"]


def test_an_interval_across_zero_says_not_distinguishable():
    rng = np.random.default_rng(1)
    cases = [f"c{i}" for i in range(6)]
    a = {s: {c: float(v) for c, v in zip(cases, rng.uniform(0.3, 0.6, 6), strict=True)}
         for s in (0, 1, 2)}
    b = {s: {c: v + (0.05 if i % 2 else -0.05) for i, (c, v) in enumerate(a[s].items())}
         for s in (0, 1, 2)}
    d = paired_difference(a, b, n_boot=2000)
    assert d["low"] < 0 < d["high"]
    assert d["mean"] == pytest.approx(0.0, abs=1e-12)
    assert "not distinguishable at this scale" in d["verdict"]
    # the interval is reproducible: the same data and resamples give the same numbers
    assert paired_difference(a, b, n_boot=2000) == d


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="seeds differ"):
        paired_difference({0: {"c": 1.0}}, {1: {"c": 1.0}})
    with pytest.raises(ValueError, match="test cases of seed 0 differ"):
        paired_difference({0: {"c": 1.0}}, {0: {"d": 1.0}})


def test_verdict_sign():
    assert "lower" in verdict(-0.1, -0.2, -0.05, 0.95, ("F", "A"))


def test_a_negligible_interval_is_called_so_whichever_side_of_zero_it_lies():
    """An interval within ±NEGLIGIBLE_DICE (the smallest gap between two mean Dice of the
    paper's Table 1) is "negligible" when it excludes 0 and "equal in practice" when it holds
    0; a wider one keeps the plain verdicts, and ``negligible=0`` turns the margin off."""
    from fuse4seg.paper import TABLE1
    from fuse4seg.study import NEGLIGIBLE_DICE

    assert NEGLIGIBLE_DICE == pytest.approx(0.004)
    assert round(TABLE1["nnU-Net"]["mean"][0] - TABLE1["transU-Net"]["mean"][0], 6) == 0.004
    lower = verdict(-0.001, -0.001, -0.0001, 0.95, ("full", "B"), 3, 6)
    assert "full scores lower than B on this data, but by less than 0.004" in lower
    assert "a difference, but a negligible one." in lower
    equal = verdict(-0.001, -0.003, 0.0004, 0.95, ("F", "A"), 3, 6)
    assert "F and A are equal in practice at this scale." in equal
    assert "not distinguishable" not in equal and "train equally" not in equal
    assert "does not show that the two train equally well" in verdict(
        -0.001, -0.003, 0.0004, 0.95, ("F", "A"), 1, 6)
    # an end at the margin is not within it
    assert "not distinguishable" in verdict(0.0, -0.004, 0.001, 0.95, ("F", "A"), 3, 6)
    assert verdict(-0.1, -0.2, -0.05, 0.95, ("F", "A"), 3, 6).endswith(
        "F scores lower than A on this data.")
    assert "not distinguishable" in verdict(-0.001, -0.003, 0.0004, 0.95, ("F", "A"), 3, 6,
                                            negligible=0)
    assert "negligible" not in verdict(-0.001, -0.001, -0.0001, 0.95, ("F", "A"), 3, 6,
                                       negligible=0)
    # too few cases: descriptive only, however small the interval
    assert "descriptive only" in verdict(-0.001, -0.002, 0.0, 0.95, ("F", "A"), 3, 2)


def test_a_margin_of_the_callers_own_is_not_credited_to_the_paper():
    """Only the default margin is the paper's Table 1 gap; another one is named as the caller's,
    and a negative or NaN margin is refused with the parameter's name."""
    own = verdict(-0.005, -0.008, -0.002, 0.95, ("F", "A"), 3, 6, negligible=0.01)
    assert "but by less than 0.01 (the caller's margin): a difference, but a negligible one." \
        in own
    assert "Table 1" not in own
    equal = verdict(0.0, -0.008, 0.006, 0.95, ("F", "A"), 3, 6, negligible=0.01)
    assert "under 0.01 in size (the caller's margin), so F and A are equal in practice" in equal
    assert "paper's Table 1" in verdict(-0.001, -0.001, -0.0001, 0.95, ("F", "A"), 3, 6)
    for bad in (-0.001, float("nan")):
        with pytest.raises(ValueError, match="negligible must be a margin >= 0"):
            verdict(-0.001, -0.001, -0.0001, 0.95, ("F", "A"), 3, 6, negligible=bad)


def test_a_bound_near_zero_shows_on_which_side_of_zero_it_lies():
    assert format_signed(0.0123) == "+0.012" and format_signed(-0.045) == "-0.045"
    # "-0.000" would hide whether 0 is inside an interval: more decimals show the sign
    assert format_signed(-0.0004) == "-0.0004" and format_signed(0.00004) == "+0.00004"
    assert format_signed(0.0) == "0.000" and format_signed(-2e-8) == "-2.0e-08"
    text = verdict(0.001, -0.0003, 0.003, 0.95, ("F", "A"), n_seeds=3, n_cases=6)
    assert "interval [-0.0003, +0.003]" in text and "-0.000," not in text


@pytest.mark.slow
def test_train_seeds_scores_every_test_case_of_every_seed(phantom_dir, tmp_path, capsys):
    from fuse4seg.cli import main
    from fuse4seg.config import get_config
    from fuse4seg.study import train_seeds

    config = get_config("smoke", {"train.warmup_epochs": 1, "train.rollout_epochs": 0,
                                  "data.split_fractions": [0.34, 0.33, 0.33]})
    runs = train_seeds(config, "average", phantom_dir, tmp_path, seeds=[0, 1])
    assert [r.seed for r in runs] == [0, 1] and runs[0].run_dir != runs[1].run_dir
    for r in runs:
        assert json.loads((r.run_dir / "run.json").read_text())["seed"] == r.seed
        assert r.per_case and all(0.0 <= v <= 1.0 for v in r.per_case.values())
    assert runs[0].per_case.keys() == runs[1].per_case.keys()
    # a second call reuses the finished runs; the CLI compares two methods
    out = tmp_path / "study.json"
    code = main(["study", "--methods", "average", "max", "--seeds", "0", "1", "--profile",
                 "smoke", "--data", str(phantom_dir), "--out", str(tmp_path), "--json", str(out),
                 "--set", "train.warmup_epochs=1", "--set", "train.rollout_epochs=0",
                 "--set", "data.split_fractions=[0.34, 0.33, 0.33]"])
    assert code == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {out}")
    report = json.loads(out.read_text())
    assert [m["seed"] for m in report["methods"]["average"]] == [0, 1]
    (comparison,) = report["comparisons"]
    assert comparison["a"] == "average" and comparison["b"] == "max"
    assert comparison["low"] <= comparison["mean"] <= comparison["high"]


@pytest.mark.slow
def test_runs_trained_in_parallel_equal_those_trained_one_after_the_other(phantom_dir, tmp_path):
    """train_parallel: spawned workers on cores // workers threads give the runs, scores and
    order that one process gives on that many threads (and a bad job is refused)."""
    import os

    import torch

    from fuse4seg.config import get_config
    from fuse4seg.study import train_parallel

    config = get_config("smoke", {"train.warmup_epochs": 1, "train.rollout_epochs": 0,
                                  "data.split_fractions": [0.34, 0.33, 0.33]})

    def jobs(out):
        return [{"config": config, "method": m, "data": phantom_dir, "out": out, "seed": s,
                 "device": "cpu"} for m in ("average", "max") for s in (0, 1)]

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        alone = train_parallel(jobs(tmp_path / "alone"), workers=1)
    finally:
        torch.set_num_threads(threads)
    together = train_parallel(jobs(tmp_path / "together"), workers=2)
    assert [(r.method, r.seed) for r in together] == [
        ("average", 0), ("average", 1), ("max", 0), ("max", 1)]
    for a, b in zip(alone, together, strict=True):
        assert a.run_dir.name == b.run_dir.name and a.best == b.best
        assert a.per_case == b.per_case and a.per_case
    # a lone job also goes to a worker, on the same threads: its numbers do not depend on how
    # many jobs came with it
    torch.set_num_threads(os.cpu_count() or 1)  # unlike the workers' (when cores > 1)
    try:
        (lone,) = train_parallel(jobs(tmp_path / "lone")[:1], workers=2)
    finally:
        torch.set_num_threads(threads)
    assert lone.best == alone[0].best and lone.per_case == alone[0].per_case
    assert train_parallel([], workers=2) == []
    with pytest.raises(ValueError, match="needs"):
        train_parallel([{"method": "average"}])


def test_the_bootstrap_resamples_seeds_as_well_as_cases():
    """Two seeds whose differences are +0.1 and -0.1 on every case: resampling the two seeds
    gives means of -0.1, 0 and +0.1 (probabilities 1/4, 1/2, 1/4), so the 95 % interval is
    [-0.1, +0.1]; resampling the cases alone would give the single point 0 (a review found
    that dropping the seeds' resampling passed every test)."""
    cases = [f"c{i}" for i in range(20)]
    a = {0: {c: 0.6 for c in cases}, 1: {c: 0.4 for c in cases}}
    b = {0: {c: 0.5 for c in cases}, 1: {c: 0.5 for c in cases}}
    out = paired_difference(a, b, n_boot=4000)
    assert out["mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["low"] == pytest.approx(-0.1) and out["high"] == pytest.approx(0.1)


def test_the_bootstrap_interval_has_the_normal_width_by_hand():
    """One seed, 50 cases of differences with sample sd s: the bootstrap mean has sd
    s·sqrt((n-1)/n)/sqrt(n), so the 95 % interval spans about 2·1.96 of it and the 50 % one
    2·0.674 (within 10 %), the 50 % interval inside the 95 % one (a review found that a 95 %
    request answered with an 80 % interval passed every test)."""
    rng = np.random.default_rng(7)
    diffs = rng.normal(0.02, 0.1, size=50)
    cases = [f"c{i}" for i in range(50)]
    a = [{c: 0.5 + d for c, d in zip(cases, diffs, strict=True)}]
    b = [{c: 0.5 for c in cases}]
    n = len(diffs)
    se = diffs.std(ddof=1) * np.sqrt((n - 1) / n) / np.sqrt(n)
    wide = paired_difference(a, b, n_boot=20_000, level=0.95)
    narrow = paired_difference(a, b, n_boot=20_000, level=0.50)
    assert wide["mean"] == pytest.approx(diffs.mean())
    assert wide["high"] - wide["low"] == pytest.approx(2 * 1.960 * se, rel=0.1)
    assert narrow["high"] - narrow["low"] == pytest.approx(2 * 0.674 * se, rel=0.1)
    assert wide["low"] < narrow["low"] < narrow["high"] < wide["high"]
    assert (wide["low"] + wide["high"]) / 2 == pytest.approx(diffs.mean(), abs=0.2 * se)
