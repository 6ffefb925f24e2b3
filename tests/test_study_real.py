"""The folds and fold caches of benchmarks/study_real.py (the study itself is slow, not here)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("study_real", ROOT / "benchmarks/study_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_case_is_tested_once_and_never_trained_on_in_its_fold():
    study = _module()
    cases = [f"c{i}" for i in range(6)]
    folds = study.folds_of(cases, 3)
    tested = sorted(c for f in folds for c in f["test"])
    assert tested == cases
    for f in folds:
        assert len(f["test"]) == 2 and len(f["val"]) == 1 and len(f["train"]) == 3
        assert not set(f["test"]) & (set(f["train"]) | set(f["val"]))
    assert folds == study.folds_of(cases, 3)  # seeded


def test_too_many_folds_is_a_clear_error():
    with pytest.raises(SystemExit, match="--folds 5"):
        _module().folds_of([f"c{i}" for i in range(6)], 5)


def test_fold_cache_replaces_only_the_split(tmp_path):
    study = _module()
    cache = tmp_path / "cache"
    (cache / "cases").mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"settings": {"a": 1}, "split": {}}))
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    fold = study.fold_cache(cache, split, tmp_path / "fold0")
    manifest = json.loads((fold / "manifest.json").read_text())
    assert manifest == {"settings": {"a": 1}, "split": split}
    assert (fold / "cases").resolve() == (cache / "cases").resolve()


def test_the_six_visible_real_cases_are_found_in_their_three_layouts(shared_data, tmp_path):
    from fuse4seg.data.layouts import find_cases

    ids = _module().link_cases([shared_data / "brats", shared_data / "brats2013"],
                               tmp_path / "cases")
    assert sorted(ids) == ["BraTS-GLI-00000-000", "BraTS2021_00006", "brats_2013_pat0001_1",
                           "brats_2013_pat0002_1", "brats_2013_pat0003_1",
                           "brats_2013_pat0004_1"]
    layouts = {c.case_id: c.layout for c in find_cases(tmp_path / "cases")}
    assert layouts["BraTS2021_00006"] == "brats2021"
    assert layouts["BraTS-GLI-00000-000"] == "brats2023"
    assert {layouts[i] for i in ids if i.startswith("brats_2013")} == {"brats2013"}


def test_stage_change_table_reads_the_targets_off_whole_runs(tmp_path):
    study_real = _module()

    def run(name, warm_val, roll_vals, warm_loss, roll_loss, same=None):
        d = tmp_path / name
        d.mkdir()
        rows = [{"epoch": 1, "stage": "warmup", "L_lower": 0.9, "val": {"mean_dice": 0.3}},
                {"epoch": 2, "stage": "warmup", "L_lower": warm_loss,
                 "val": {"mean_dice": warm_val}}]
        rows += [{"epoch": 3 + i, "stage": "rollout", "L_lower": roll_loss,
                  "val": {"mean_dice": v}} for i, v in enumerate(roll_vals)]
        if same is not None:  # (reference at the end of the warm-up, first rollout loss)
            rows[1]["L_lower_ref_next"], rows[2]["L_lower_first"] = same
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    # fold 0: the rollout keeps its warm-up (drops 0.01, 0.00, -0.02; sd of 0.5/0.6/0.7 = 0.1)
    # fold 1: seed 1 loses 0.3 in the rollout; its logged loss jumps 1.5x, 1.2x on the same
    # D_tr slices (fold 1 logged the same-slice reference, fold 0 did not)
    fold0 = {0: run("a0", 0.5, [0.49, 0.55], 0.5, 0.55), 1: run("a1", 0.6, [0.6], 0.5, 0.5),
             2: run("a2", 0.7, [0.72], 0.5, 0.5)}
    fold1 = {0: run("b0", 0.5, [0.5], 0.5, 0.5, (0.6, 0.6)),
             1: run("b1", 0.6, [0.3, 0.6], 0.4, 0.6, (0.5, 0.6)),
             2: run("b2", 0.7, [0.7], 0.5, 0.5, (0.7, 0.7))}
    prior1 = {0: run("c0", 0.5, [0.5], 0.5, 0.5), 1: run("c1", 0.6, [0.6], 0.5, 0.5),
              2: run("c2", 0.7, [0.7], 0.5, 0.5)}
    runs = {"fuse4seg": {0: fold0, 1: fold1}, "average": {1: prior1}}
    splits = [{"val": ["case_v0"]}, {"val": ["case_v1"]}]
    rows = [r for r in study_real.stage_change(runs, splits) if r.startswith("| 0") or
            r.startswith("| 1")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[:3] for c in cells] == [["0", "case_v0", "`fuse4seg`"],
                                      ["1", "case_v1", "`fuse4seg`"],
                                      ["1", "case_v1", "`average`"]]
    assert cells[0][5] == "0.100" and cells[0][6:] == ["yes", "yes"]
    assert cells[0][3] == "– (1.100), – (1.000), – (1.000)"  # logged ratio only
    assert cells[1][3] == "1.000 (1.000), 1.200 (1.500), 1.000 (1.000)"
    assert cells[1][6:] == ["no", "no"]
    assert cells[2][4] == "0.000, 0.000, 0.000" and cells[2][6:] == ["yes", "yes"]
    table = study_real.stage_change(runs, splits)
    assert "(Seeds [0, 1, 2] in that order;" in table[-2]
    # rows with other seeds: the footer does not name one row's seeds for all
    runs["average"][1] = {3: prior1[0], 4: prior1[1]}
    table = study_real.stage_change(runs, splits)
    assert "do not share one seed set" in table[-2] and "[0, 1, 2]" not in table[-2]


def test_compare_studies_pairs_the_stored_test_scores(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_studies",
                                                  ROOT / "benchmarks/compare_studies.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def study(name, shift):
        for fold, cases in enumerate((["a", "b"], ["c", "d"])):
            for seed in (0, 1):
                run = tmp_path / name / f"fold{fold}" / "runs" / f"average-default-{fold}{seed}"
                run.mkdir(parents=True)
                (run / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
                per_case = {c: {k: {"dice": 0.1 * (i + 1) + shift + 0.01 * seed, "iou": 0.0}
                                for k in ("NCR", "ED", "ET")} for i, c in enumerate(cases)}
                (run / "test.json").write_text(json.dumps({"result": {"per_case": per_case}}))
        return tmp_path / name

    a, b = study("a", 0.05), study("b", 0.0)
    compare.main([str(a), str(b), "--methods", "average", "--names", "64", "80"])
    row = capsys.readouterr().out.splitlines()[-1]
    # every (seed, case) differs by +0.05, so the interval is the point
    assert row == "| `average` | 0.205 | 0.155 | +0.050 | [+0.050, +0.050] | 4 × 2 |"
    with pytest.raises(SystemExit, match="no run of fuse4seg"):
        compare.main([str(a), str(b), "--methods", "fuse4seg"])


def test_stage_noise_reads_a_study_validated_every_epoch(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("stage_noise", ROOT / "benchmarks/stage_noise.py")
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    for seed in (1, 0):  # written out of order: the table sorts by seed
        run = tmp_path / "fold0" / "runs" / f"average-default-{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
        vals = [0.1, 0.3] * 5 + [0.2 + 0.1 * seed] * 10  # warm-up ends on 0.3, level 0.22
        rows = [{"epoch": e + 1, "stage": "warmup" if e < 10 else "rollout", "L_lower": 0.5,
                 "val": {"mean_dice": v}} for e, v in enumerate(vals)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = noise.rows(tmp_path, "average", window=5, cadence=5)[0]
    assert row.startswith("| fold0 | `average` | 0, 1 | 0.300, 0.300 | 0.220, 0.220 |")
    assert row.endswith("| 0.200, 0.300 | +0.100, +0.000 | +0.020, -0.080 | yes, yes |")
    with pytest.raises(SystemExit, match="no run of fuse4seg"):
        noise.rows(tmp_path, "fuse4seg", 5, 5)
