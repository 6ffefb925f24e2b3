"""fuse4seg.curves: the plateau test, the stage-change targets, the report's table and plot."""

import json

import matplotlib
import numpy as np
import pytest

from fuse4seg import curves

matplotlib.use("Agg")


def _curve(vals, losses=None, warm=0):
    losses = losses or [1.0] * len(vals)
    return [{"epoch": i + 1, "stage": "warmup" if i < warm else "rollout" if warm else "train",
             "L_lower": loss, "val": v, "elapsed_s": 10.0 * (i + 1)}
            for i, (v, loss) in enumerate(zip(vals, losses, strict=True))]


def test_a_flat_end_within_the_seed_sd_is_a_plateau_and_a_rising_one_is_not():
    flat = [_curve([0.1, 0.3, 0.5, 0.50, 0.51, 0.52, 0.52, 0.5 + d]) for d in (0.0, 0.1, -0.1)]
    p = curves.plateau(flat)
    # 8 epochs: the last quarter runs from epoch 6 to epoch 8
    assert (p["from_epoch"], p["to_epoch"]) == (6, 8)
    assert p["change_mean"] == pytest.approx(-0.02)
    assert p["sd_end"] == pytest.approx(0.1)
    assert p["plateau"] is True
    rising = [_curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8 + d]) for d in (0.0, 0.01, -0.01)]
    p = curves.plateau(rising)
    assert p["change_mean"] == pytest.approx(0.2) and p["plateau"] is False
    assert curves.plateau([flat[0]])["plateau"] is None  # one seed has no sd


def test_plateau_refuses_unvalidated_epochs_and_mixed_lengths():
    with pytest.raises(ValueError, match="val_every=1"):
        curves.plateau([_curve([0.1, None, None, None, None, None, None, 0.5])] * 2)
    with pytest.raises(ValueError, match="different lengths"):
        curves.plateau([_curve([0.1] * 8), _curve([0.1] * 9)])
    with pytest.raises(ValueError, match="no curves"):
        curves.plateau([])


def test_rollout_targets_measure_the_stage_change():
    # warm-up 3 epochs, rollout 2; seed 0 jumps in loss (ratio 1.5) and falls 0.2 in Dice
    runs = [_curve([0.4, 0.5, 0.6, 0.4, 0.6], [0.9, 0.7, 0.6, 0.9, 0.6], warm=3),
            _curve([0.4, 0.5, 0.4, 0.4, 0.45], [0.9, 0.7, 0.6, 0.6, 0.6], warm=3)]
    t = curves.rollout_targets(runs)
    assert t["loss_ratio"] == pytest.approx([1.5, 1.0])
    assert t["drop"] == pytest.approx([0.2, 0.0])
    assert t["sd_warm"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    assert t["loss_ok"] is False and t["drop_ok"] is False  # 0.2 > sd 0.141
    assert t["loss_basis"] == "logged L_lower"  # runs without the same-slice reference
    assert t["loss_ratio_logged"] == t["loss_ratio"]
    assert curves.rollout_targets([_curve([0.1, 0.2])]) is None  # no stages: no targets


def test_warmup_noise_separates_the_last_validation_from_the_warmups_level():
    # 10 warm-up epochs swinging 0.1 <-> 0.3 and ending high, then a flat rollout at 0.2:
    # against the last validation the rollout "drops" 0.1, against the level (0.22) 0.02
    warm = [0.1, 0.3] * 5
    run = _curve(warm + [0.2] * 10, [0.5] * 20, warm=10)
    t = curves.warmup_noise([run], window=5, cadence=5)
    assert t["last"] == [0.3] and t["rollout_min"] == pytest.approx([0.2])
    assert t["level"] == pytest.approx([0.22]) and t["drop_level"] == pytest.approx([0.02])
    assert t["drop_last"] == pytest.approx([0.1])
    assert t["epoch_sd"] == pytest.approx([np.std([0.3, 0.1, 0.3, 0.1, 0.3], ddof=1)])
    assert t["within_noise"] == [True]  # 0.02 below the level, the epochs scatter by 0.11
    # only the epochs a val_every=5 run validates count: a dip at epoch 12 is not seen
    dip = _curve(warm + [0.2, 0.0] + [0.2] * 8, [0.5] * 20, warm=10)
    assert curves.warmup_noise([dip])["rollout_min"] == pytest.approx([0.2])
    low = curves.warmup_noise([dip], cadence=1)
    assert low["rollout_min"] == pytest.approx([0.0]) and low["within_noise"] == [False]
    assert curves.warmup_noise([_curve([0.1, 0.2])]) is None
    sparse = _curve(warm + [0.2] * 10, [0.5] * 20, warm=10)
    sparse[8]["val"] = None
    with pytest.raises(ValueError, match="val_every=1"):
        curves.warmup_noise([sparse])


def test_the_loss_ratio_compares_the_same_slices_when_the_run_logged_them():
    # the logged L_lower jumps 0.6 -> 0.9 (other batches); on the same D_tr slices the
    # follower went from 0.80 before the stage change to 0.84 in the first rollout epoch
    run = _curve([0.4, 0.5, 0.6, 0.6, 0.6], [0.9, 0.7, 0.6, 0.9, 0.6], warm=3)
    run[2]["L_lower_ref_next"], run[3]["L_lower_first"] = 0.80, 0.84
    t = curves.rollout_targets([run])
    assert t["loss_ratio"] == pytest.approx([1.05]) and t["loss_ok"] is True
    assert t["loss_ratio_logged"] == pytest.approx([1.5])
    assert t["loss_basis"] == "same D_tr slices"
    mixed = curves.rollout_targets([run, _curve([0.4, 0.5, 0.6, 0.6, 0.6], warm=3)])
    assert mixed["loss_basis"] == "mixed" and mixed["loss_ratio"] == pytest.approx([1.05, 1.0])
    assert mixed["same_slices"] == [True, False]
    assert mixed["loss_ok"] is None  # no one verdict over unlike ratios
    report = {"data": "phantom", "profile": "default", "methods": {"fuse4seg": {"runs": [
        {"seed": s, "seconds": 1.0, "curve": c}
        for s, c in enumerate([run, _curve([0.4, 0.5, 0.6, 0.6, 0.6], warm=3)])]}}}
    # each run's cell says what it holds: the old run has only its logged ratio
    assert "| `fuse4seg` | 1.05 (1.50), – (1.00) |" in curves.summary_markdown(report)
    assert curves.summary_markdown(report).endswith("| not judged; met |")  # mixed basis


def _report():
    return {"data": "phantom", "profile": "default", "methods": {
        "average": {"runs": [{"seed": s, "seconds": 100.0 + s,
                              "curve": _curve([0.1 * s + 0.1 * i for i in range(8)])}
                             for s in range(3)]},
        "fuse4seg": {"runs": [{"seed": s, "seconds": 200.0,
                               "curve": _curve([0.3, 0.4, 0.5, 0.5, 0.45, 0.5, 0.5, 0.5 + s / 50],
                                               warm=4)} for s in range(3)]},
    }}


def test_the_summary_table_has_a_row_per_method_with_its_verdict():
    text = curves.summary_markdown(_report())
    first, second = text.split("\n\n")
    rows = [line for line in first.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`average`", "`fuse4seg`"]
    # average rises 0.2 in the last 1/4 in every seed; fuse4seg by 0, 0.02, 0.04 (sd 0.02)
    assert "| 101 |" in rows[0] and rows[0].endswith("| no; 3 of 3 |")
    assert rows[1].endswith("| yes; 2 of 3 |")
    # within the sd (0.1) but every seed still rising (by 0.01): "not yet", not "yes"
    report = {"methods": {"average": {"runs": [
        {"seed": s, "seconds": 1.0, "curve": _curve([0.1 * s + 0.4] * 6 + [0.1 * s + 0.41] * 2)}
        for s in range(3)]}}}
    row = curves.summary_markdown(report).splitlines()[2]
    assert "| +0.010, epochs 6→8 (0.100) | not yet; 3 of 3 |" in row
    # mean ± sd, the sd bound to its sign by a no-break space (formatting.format_mean_sd)
    assert "±\u00a0" in rows[0] and " ± " not in text
    # the stage-change table has a row only for the method with a warm-up and a rollout
    stage = [line for line in second.splitlines() if line.startswith("| `")]
    assert len(stage) == 1 and stage[0].startswith("| `fuse4seg` | – (1.00), – (1.00), – (1.00) |")
    # the verdicts: logged ratios 1.00 <= 1.15; drops 0.05 each (0.5 -> 0.45) > the sd 0
    assert stage[0].endswith("| met (logged); missed |")


def test_the_plot_draws_each_seed_and_the_mean(tmp_path):
    report = _report()
    path = tmp_path / "curves.json"
    path.write_text(json.dumps(report))
    fig = curves.plot_learning_curves(curves.load_report(path))
    left, right = fig.axes
    assert len(left.lines) == 3 + 1 + 3 + 1 + 1  # 3 seeds + mean, twice, + fuse4seg's stage line
    assert left.get_legend() is not None
    # the two means (bold) are told apart by their dashes, not by colour alone
    means = [line for line in left.lines if line.get_linewidth() == 2]
    assert len(means) == 2 and means[0].get_linestyle() != means[1].get_linestyle()
    with pytest.raises(FileNotFoundError, match="learning_curves.py"):
        curves.load_report(tmp_path / "missing.json")


def test_curve_reads_a_run_folder(tmp_path):
    rows = [{"epoch": 1, "stage": "warmup", "L_lower": 0.9, "elapsed_s": 3.0},
            {"epoch": 2, "stage": "rollout", "L_lower": 0.8, "elapsed_s": 6.0,
             "val": {"mean_dice": 0.4}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curves.curve(tmp_path) == [
        {"epoch": 1, "stage": "warmup", "L_lower": 0.9, "val": None, "elapsed_s": 3.0},
        {"epoch": 2, "stage": "rollout", "L_lower": 0.8, "val": 0.4, "elapsed_s": 6.0},
    ]


def test_config_differences_name_the_settings_a_report_was_measured_with():
    from fuse4seg.config import get_config
    from fuse4seg.train.runs import flatten

    here = get_config("default")
    report = {"config": json.loads(json.dumps(flatten(here)))}  # as the JSON file holds it
    assert curves.config_differences(report, here) == []
    # seeds and the validation cadence vary by design; the geometry does not
    other = get_config("default", {"train.seed": 3, "train.val_every": 1})
    assert curves.config_differences(report, other) == []
    older = get_config("default", {"data.crop_size": 80})
    report = {"config": json.loads(json.dumps(flatten(older)))}
    assert curves.config_differences(report, here) == [
        "data.crop_size: 80 in the report, 64 here"]
    assert "does not record" in curves.config_differences({}, here)[0]
    # a setting added after the report was written ran at its default there
    predates = {"config": {k: v for k, v in json.loads(json.dumps(flatten(here))).items()
                           if k != "train.warmup_anneal"}}
    assert curves.config_differences(predates, here) == []
    annealed = get_config("default", {"train.warmup_anneal": True})
    assert curves.config_differences(predates, annealed) == [
        "train.warmup_anneal: False in the report, True here"]


def test_same_seed_markdown_sets_a_run_beside_its_seeds_curve(tmp_path):
    """A run trained elsewhere sits beside the same seed's curve at its last warm-up validation
    and its last validation (the curve's values at those epochs), with both thread counts, the
    signed difference and the curves' seed sd there; a seed or epoch the report lacks is left
    out, and nothing shared gives None."""
    report = {"methods": {"fuse4seg": {"runs": [
        {"seed": s, "threads": 1, "curve": _curve([0.1, 0.2 + d, 0.3, 0.4 + d], warm=2)}
        for s, d in ((0, 0.0), (1, 0.1), (2, -0.1))]}}}

    def run(name, vals, threads=2):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"epoch": e, "stage": "warmup" if e <= 2 else "rollout",
                 **({"val": {"mean_dice": v}} if v is not None else {})}
                for e, v in enumerate(vals, start=1)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "run.json").write_text(json.dumps({"threads": threads}))
        return folder

    table = curves.same_seed_markdown(
        report, "fuse4seg", {0: run("a", [None, 0.25, None, 0.35]), 7: run("b", [0.1] * 4)})
    lines = table.splitlines()
    assert lines[0].startswith("| seed | validation | this run (torch threads) |")
    assert lines[2:] == [
        "| 0 | end of warm-up (epoch 2) | 0.250 (2) | 0.200 (1) | +0.050 | 0.100 |",
        "| 0 | end (epoch 4) | 0.350 (2) | 0.400 (1) | -0.050 | 0.100 |",
    ]
    assert curves.same_seed_markdown(report, "fuse4seg", {7: tmp_path / "b"}) is None
    assert curves.same_seed_markdown(report, "average", {0: tmp_path / "a"}) is None


def test_compare_curves_counts_the_fields_that_differ_without_the_clocks(tmp_path, capsys):
    """``benchmarks/compare_curves.py``, which RESULTS' regenerations of the curves quote."""
    from bench_scripts import load

    compare_curves = load("compare_curves")

    def report(vals, clock=10.0):
        runs = [{"seed": s, "curve": [{**row, "elapsed_s": clock * row["epoch"]}
                                      for row in _curve(vals, warm=2)]} for s in (0, 1)]
        return {"commit": "x", "code": "y", "cpu": "z", "methods": {"average": {"runs": runs}}}

    old = report([0.1, 0.2, 0.3, 0.4])
    same = report([0.1, 0.2, 0.3, 0.4], clock=99.0)  # only the clocks differ
    result = compare_curves.compare(old, same)
    assert (result["compared"], result["differ"]) == (2 * 4 * 4, 0)
    moved = report([0.1, 0.2, 0.3, 0.45])
    result = compare_curves.compare(old, moved)
    assert result["differ"] == 2 and result["largest"] == pytest.approx(0.05)
    assert result["last_val"][("average", 1)] == (0.4, 0.45)
    with pytest.raises(ValueError, match="different runs or epochs"):
        compare_curves.compare(old, report([0.1, 0.2, 0.3]))
    paths = []
    for name, rep in (("a.json", old), ("b.json", moved)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(rep))
    assert compare_curves.main([str(p) for p in paths]) == 0
    assert "2 of 32 fields differ (elapsed_s left out)" in capsys.readouterr().out
    assert compare_curves.main([str(tmp_path / "missing.json"), str(paths[1])]) == 2
    assert "missing.json: no learning-curve report" in capsys.readouterr().err
