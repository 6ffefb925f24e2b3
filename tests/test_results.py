"""Chapter 6's tables from run results (fuse4seg.results): mean ± sd by hand, paper order,
mismatched cases refused; the cached test evaluation (fuse4seg.study.evaluate_cached)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fuse4seg import results as R
from fuse4seg.formatting import format_mean_sd
from fuse4seg.paper import TABLE1, TABLE3
from fuse4seg.study import SeedResult


def _test(per_case: dict[str, tuple[float, float, float]]) -> dict:
    """An ``evaluate_run``-like result from per-case (NCR, ED, ET) Dice (IoU = Dice / 2)."""
    scores = {
        case: {c: {"dice": d, "iou": d / 2} for c, d in zip(("NCR", "ED", "ET"), v, strict=True)}
        for case, v in per_case.items()
    }
    mean = {c: {k: float(np.mean([s[c][k] for s in scores.values()])) for k in ("dice", "iou")}
            for c in ("NCR", "ED", "ET")}
    return {"cases": sorted(per_case), "per_case": scores, "mean": mean,
            "mean_dice": float(np.mean([mean[c]["dice"] for c in mean])),
            "mean_iou": float(np.mean([mean[c]["iou"] for c in mean]))}


def _seed(method, seed, per_case):
    return SeedResult(method, seed, Path(f"/runs/{method}-smoke-{seed:08d}"), None,
                      _test(per_case))


def test_mean_and_sample_sd_over_seeds_by_hand():
    seeds = [_seed("average", 0, {"c1": (0.2, 0.4, 0.6)}),
             _seed("average", 1, {"c1": (0.4, 0.4, 0.7)})]
    (row,) = R.summary_rows({"average": seeds})
    assert row["seeds"] == [0, 1]
    assert row["runs"] == ["average-smoke-00000000", "average-smoke-00000001"]
    mean, sd = row["NCR_dice"]
    assert mean == pytest.approx(0.3) and sd == pytest.approx(np.sqrt(0.02))  # ddof=1
    assert row["ED_dice"] == pytest.approx((0.4, 0.0))
    assert row["ET_iou"][0] == pytest.approx(0.325)
    # the mean column is the mean over NCR, ED, ET per seed, then over seeds: (0.4 + 0.5) / 2
    assert row["mean_dice"][0] == pytest.approx(0.45)
    assert row["mean_dice"][1] == pytest.approx(np.std([0.4, 0.5], ddof=1))


def test_one_seed_has_no_sd_and_formats_without_one():
    (row,) = R.summary_rows({"max": [_seed("max", 0, {"c1": (0.1, 0.2, 0.3)})]})
    assert row["NCR_dice"] == (pytest.approx(0.1), None)
    assert format_mean_sd(row["NCR_dice"]) == "0.100"
    # a no-break space binds the sd to its sign: a narrow cell wraps only before the ±
    assert format_mean_sd((0.51234, 0.0345)) == "0.512 ±\u00a00.035"
    with pytest.raises(ValueError, match="no values"):
        R.mean_sd([])


def test_a_seed_without_test_cases_is_an_error():
    bare = SeedResult("average", 0, Path("/runs/a"), None, None)
    with pytest.raises(ValueError, match="no test evaluation"):
        R.summary_rows({"average": [bare]})


def _all_methods():
    return {m: [_seed(m, 0, {"c1": (0.1 * i, 0.2, 0.3), "c2": (0.5, 0.5, 0.5)})]
            for i, m in enumerate(reversed(R.TABLE1_ORDER))}


def test_table1_is_in_the_papers_order_with_the_papers_rows_beside():
    text = R.table1_markdown(R.summary_rows(_all_methods()))
    lines = text.splitlines()
    assert {line.count("|") for line in lines} == {10}  # nine columns on every row
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    headings = [label for label in labels if label.startswith("***")]
    assert headings == ["***fixed-rule fusion + seg.***", "***disjoint fusion + seg.***",
                        "***direct multi-channel***", "***bi-level (proposed)***"]
    ours = [label for label in labels if label.startswith("**") and label not in headings]
    assert [o.split("`")[1] for o in ours] == list(R.TABLE1_ORDER)
    paper = [label for label in labels if label.startswith("*the paper reports: ")]
    assert [p.removeprefix("*the paper reports: ").rstrip("*") for p in paper] == list(TABLE1)
    # each family: its heading, our rows, then the paper's; the proposed method last
    assert labels.index(ours[2]) < labels.index("*the paper reports: DDFM + Seg*")
    assert labels.index("***direct multi-channel***") < labels.index(ours[3])
    assert labels[-2].endswith("(`fuse4seg`)") and labels[-1].endswith("Fuse4Seg*")
    assert "*0.910*" in lines[-1]  # the paper's mean Dice, in italics


def test_table1_leaves_out_methods_not_run():
    text = R.table1_markdown(R.summary_rows({"fuse4seg": _all_methods()["fuse4seg"]}))
    assert "`average`" not in text and "`fuse4seg`" in text
    assert "fixed-rule" not in text  # a family with no row has no heading
    assert text.count("the paper reports") == len(TABLE1)


def test_table3_puts_each_papers_row_under_ours():
    runs = {a: [_seed("fuse4seg", 0, {"c1": (0.3, 0.3, 0.3)})] for a in ("baseline", "A", "B",
                                                                        "full")}
    lines = R.table3_markdown(R.summary_rows(runs)).splitlines()
    assert {line.count("|") for line in lines} == {11}
    lines = lines[2:]
    assert len(lines) == 8
    for ours, paper, name in zip(lines[::2], lines[1::2], TABLE3, strict=True):
        assert "the paper reports" not in ours and f"the paper reports: {name}" in paper
        assert ours.split("|")[2] == paper.split("|")[2]  # the same ✓/✗ components
        assert f"*{TABLE3[name]['mean'][0]:.3f}*" in paper
    assert lines[0].split("|")[2].strip() == "✗ ✗ ✗"
    assert lines[-1].split("|")[2].strip() == "✓ ✓ ✓"


def test_per_case_table_and_mismatched_cases():
    runs = {"fuse4seg": [_seed("fuse4seg", 0, {"b": (0.3, 0.6, 0.9), "a": (0, 0, 0.3)})],
            "average": [_seed("average", 0, {"a": (0.1, 0.1, 0.1), "b": (0.2, 0.2, 0.2)})]}
    cases, rows = R.per_case_table(runs)
    assert cases == ["a", "b"]
    assert rows[0][:2] == ("fuse4seg", 0) and rows[0][2] == pytest.approx([0.1, 0.6])
    lines = R.per_case_markdown(runs).splitlines()  # one seed: no seed column
    assert lines[0] == "| test case | fuse4seg | average |"
    assert lines[2:] == ["| a | 0.100 | 0.100 |", "| b | 0.600 | 0.200 |",
                         "| **mean** | **0.350** | **0.150** |"]
    runs["average"].append(_seed("average", 1, {"a": (0.3, 0.3, 0.3), "b": (0.5, 0.5, 0.5)}))
    lines = R.per_case_markdown(runs).splitlines()
    assert lines[0] == "| test case | seed | fuse4seg | average |"
    assert lines[2:] == ["| a | 0 | 0.100 | 0.100 |", "| b | 0 | 0.600 | 0.200 |",
                         "| **mean** | 0 | **0.350** | **0.150** |",
                         "| a | 1 | – | 0.300 |", "| b | 1 | – | 0.500 |",
                         "| **mean** | 1 | – | **0.400** |"]
    # a prefix every case id shares is named once, in the header
    named = {"average": [_seed("average", 0, {"Phantom_00001": (0.1, 0.1, 0.1),
                                              "Phantom_00014": (0.2, 0.2, 0.2)})]}
    lines = R.per_case_markdown(named).splitlines()
    assert lines[0] == "| test case (Phantom_…) | average |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["00001", "00014", "**mean**"]
    runs["max"] = [_seed("max", 0, {"a": (0.1, 0.1, 0.1), "c": (0.2, 0.2, 0.2)})]
    with pytest.raises(ValueError, match="max, seed 0: scored on cases"):
        R.per_case_table(runs)


def test_compare_pairs_fuse4seg_with_each_baseline_present():
    cases = {f"c{i}": (0.5, 0.5, 0.5) for i in range(6)}
    lower = {c: (0.3, 0.3, 0.3) for c in cases}
    runs = {"fuse4seg": [_seed("fuse4seg", s, cases) for s in (0, 1)],
            "average": [_seed("average", s, lower) for s in (0, 1)]}
    (diff,) = R.compare(runs, n_boot=200)  # disjoint_ae was not run: left out
    assert (diff["a"], diff["b"]) == ("fuse4seg", "average")
    assert diff["mean"] == pytest.approx(0.2) and diff["n_seeds"] == 2
    assert "scores higher than `average`" in diff["verdict"]
    runs["disjoint_ae"] = [_seed("disjoint_ae", 0, lower)]
    with pytest.raises(ValueError, match="seeds differ"):
        R.compare(runs, n_boot=200)


def test_scale_note_never_claims_a_reproduction_on_small_data():
    note = R.scale_note("phantom (12 cases)", 12, "default")
    assert "not reproduce the paper's BraTS 2021 result" in note and "phantom" in note
    assert "on this phantom at this profile only" in note  # they rank, but only here
    note = R.scale_note("data in /d (5 cases)", 5, "paper")
    assert "not reproduce the paper's result" in note
    note = R.scale_note("data in /d (1251 cases)", 1251, "paper")
    assert "not reproduce" not in note and "BraTS 2021" in note


def test_collect_refuses_unknown_names(tmp_path):
    from fuse4seg.config import get_config

    with pytest.raises(ValueError, match="unknown"):
        R.collect(get_config("smoke"), tmp_path, tmp_path, methods=["fuse5seg"])
    with pytest.raises(ValueError, match="unknown"):
        R.collect(get_config("smoke"), tmp_path, tmp_path, methods=[], ablations=["C"])


def test_collect_reuses_the_method_for_the_full_variant(monkeypatch, tmp_path):
    import fuse4seg.study as study
    from fuse4seg.config import get_config

    calls = []

    def fake(config, method, data, out, seed, ablation=None, device=None):
        calls.append((method, ablation, seed))
        return _seed(method if ablation is None else f"ablation {ablation}", seed,
                     {"c": (0.1, 0.2, 0.3)})

    monkeypatch.setattr(study, "train_one", fake)
    by_method, by_ablation = R.collect(get_config("smoke"), tmp_path, tmp_path,
                                       methods=["fuse4seg"], seeds=[0, 1])
    assert calls == [(m, a, s) for m, a in [("fuse4seg", None), ("disjoint_ae", "baseline"),
                                            ("fuse4seg", "A"), ("fuse4seg", "B")]
                     for s in (0, 1)]
    assert [r.run_dir for r in by_ablation["full"]] == [r.run_dir for r in by_method["fuse4seg"]]
    assert by_ablation["full"][0].method == "ablation full"
    assert list(by_ablation) == ["baseline", "A", "B", "full"]  # the order given
    assert [r.seed for r in by_ablation["A"]] == [0, 1]
    assert by_ablation["A"][0].method == "ablation A"
    with pytest.raises(ValueError, match="distinct seeds"):
        R.collect(get_config("smoke"), tmp_path, tmp_path, methods=["average"], seeds=[0, 0])


def test_trained_now_compares_checkpoint_stamps(tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "last.pt").write_bytes(b"1")
    before = R.checkpoint_stamps(tmp_path)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"2")
    assert R.checkpoint_stamps(tmp_path).keys() - before.keys() == {"b"}
    assert R.checkpoint_stamps(tmp_path / "missing") == {}
    # a run that trained on (its last.pt rewritten) gets a new stamp; an untouched one keeps it
    os.utime(tmp_path / "a" / "checkpoints" / "last.pt", ns=(before["a"] + 10**9,) * 2)
    after = R.checkpoint_stamps(tmp_path)
    assert after["a"] == before["a"] + 10**9 and R.checkpoint_stamps(tmp_path)["b"] == after["b"]


def test_evaluate_cached_reuses_a_matching_evaluation_only(monkeypatch, tmp_path):
    import fuse4seg.inference as inference
    from fuse4seg.study import evaluate_cached

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"weights")
    data = tmp_path / "cache"
    data.mkdir()
    (data / "manifest.json").write_text('{"cases": ["c1"]}')
    calls = []

    def fake_evaluate(run_dir, data, split="test", which="best", device="auto"):
        calls.append(split)
        return {"per_case": {"c1": len(calls)}}

    monkeypatch.setattr(inference, "evaluate_run", fake_evaluate)
    first = evaluate_cached(run, data)
    assert first == {"per_case": {"c1": 1}} and calls == ["test"]
    assert json.loads((run / "test.json").read_text())["result"] == first
    assert evaluate_cached(run, data) == first and calls == ["test"]  # reused
    (run / "checkpoints" / "best.pt").write_bytes(b"retrained")  # another checkpoint
    assert evaluate_cached(run, data)["per_case"]["c1"] == 2
    (data / "manifest.json").write_text('{"cases": ["c1", "c2"]}')  # other data
    assert evaluate_cached(run, data)["per_case"]["c1"] == 3
    monkeypatch.setattr("fuse4seg.utils.code_digest", lambda n=12: "other-code")
    assert evaluate_cached(run, data)["per_case"]["c1"] == 4  # other evaluation code
    assert evaluate_cached(run, data, split="val")["per_case"]["c1"] == 5
    assert (run / "val.json").is_file()


def test_shared_cache_is_chapter_4s():
    assert R.shared_cache("_build/cache", "smoke") == Path("_build/cache/ch04-smoke")
    text = (Path(__file__).resolve().parents[1] / "book" / "04_bilevel_training.md").read_text()
    assert "shared_cache(cache_dir, profile)" in text


def test_the_run_table_counts_a_shared_warmup_once(tmp_path):
    def run(name, rows, **info):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "run.json").write_text(json.dumps(info))
        return SeedResult(name, 0, folder, None, None)

    rows = [{"epoch": 1, "stage": "warmup", "elapsed_s": 100.0},
            {"epoch": 2, "stage": "rollout", "elapsed_s": 250.0}]
    full = run("fuse4seg-x", rows, warmup_from=None)
    a = run("fuse4seg-a", [rows[0], {**rows[1], "elapsed_s": 240.0}], warmup_from="fuse4seg-x")
    text, totals = R.runs_markdown([{"full": [full], "A": [a]}], {}, {"fuse4seg-x": 1,
                                                                     "fuse4seg-a": 1})
    assert "| 250 s |" in text
    assert "| 140 s (+ 100 s: full's warm-up) |" in text  # the donor by its row's name
    assert totals["seconds"] == pytest.approx(390.0) and totals["trained"] == 2
    # the same stamp before and after: reused, and out of the trained totals
    text, totals = R.runs_markdown([{"full": [full], "A": [a]}], {"fuse4seg-x": 1},
                                   {"fuse4seg-x": 1, "fuse4seg-a": 2})
    assert "| `fuse4seg-x` | 2 | 250 s | reused |" in text
    assert text.rstrip().endswith("| trained |")
    assert totals["trained"] == 1 and totals["trained_seconds"] == pytest.approx(140.0)
    assert totals["seconds"] == pytest.approx(390.0)


def _run_with(tmp_path: Path, name: str, seed: int, **info) -> SeedResult:
    run_dir = tmp_path / f"{name}-{seed}"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(info))
    return SeedResult(name, seed, run_dir, None, None)


def test_thread_note_tells_runs_trained_alike_from_runs_that_were_not(tmp_path):
    """results.thread_note, under chapter 6's run table and chapter 4's comparison: a review
    found chapter 4's runs on two threads compared with one-thread rivals without a word."""
    a = [_run_with(tmp_path, "average", s, threads=1, gpu=None) for s in (0, 1)]
    f = [_run_with(tmp_path, "fuse4seg", s, threads=1, gpu=None) for s in (0, 1)]
    alike = R.thread_note([{"average": a, "fuse4seg": f}, {"full": f}])
    assert alike == ("Every run here trained on 1 torch thread, so no difference between rows "
                     "comes from a different thread count.")
    f2 = [_run_with(tmp_path, "fuse4seg2", s, threads=2, gpu=None) for s in (0, 1)]
    mixed = R.thread_note([{"average": a, "fuse4seg": f2}])
    assert mixed.startswith("**The runs here did not all train alike**")
    assert "on 1 torch thread: `average` 0, `average` 1; on 2 torch threads: `fuse4seg` 0, " \
           "`fuse4seg` 1." in mixed
    g = [_run_with(tmp_path, "gpu", 0, threads=8, gpu="NVIDIA H100", device="cuda")]
    assert R.thread_note([{"g": g}]).startswith("Every run here trained on a GPU (NVIDIA H100)")
    # a CPU run on a machine with a GPU is a CPU run
    c = [_run_with(tmp_path, "cpu_on_gpu_machine", 0, threads=8, gpu="NVIDIA H100", device="cpu")]
    assert R.thread_note([{"c": c}]).startswith("Every run here trained on 8 torch threads")
    (tmp_path / "none").mkdir()
    lost = SeedResult("x", 0, tmp_path / "none", None, None)  # no run.json
    assert "an unrecorded thread count" in R.thread_note([{"x": [lost], "average": a}])
    assert R.thread_note([{}]) == ""


def _drift(ema: float, live: float, scale: float) -> dict:
    return {"updates": 80, "initial_share": 0.45, "max_from_x_avg": scale,
            "rows": [{"leader": "initial", "from_x_avg": 0.0, "from_live": live},
                     {"leader": "live", "from_x_avg": live, "from_live": 0.0},
                     {"leader": "EMA", "from_x_avg": ema, "from_live": live - ema}]}


def test_drift_note_says_when_the_leader_barely_moved_x_f():
    """results.drift_note: the reviewer's reading of chapter 4 (x_f 0.0015 from x_avg) put in
    a sentence under the comparison with ``average``: the means over seeds against the max
    rule's distance, and the caveat only below a tenth of it."""
    small = R.drift_note([_drift(0.001, 0.004, 0.05), _drift(0.002, 0.006, 0.05), None])
    assert small.startswith("Mean |x_f − x_avg| over 2 runs: 0.0015 for the EMA leader")
    assert "0.0050 for the live leader" in small and "lies 0.0500 from x_avg" in small
    assert "moved x_f 3% of that distance" in small
    assert "**At this scale the leader has barely moved x_f**" in small
    assert "a comparison of `fuse4seg` with `average`" in small
    assert "of `full` with `average`" in R.drift_note([_drift(0.001, 0.004, 0.05)], "full")
    moved = R.drift_note([_drift(0.02, 0.03, 0.05)])
    assert moved.startswith("Mean |x_f − x_avg| in this run: 0.0200")
    assert "40% of that distance" in moved and "barely" not in moved
    assert R.drift_note([None, None]) == "" and R.drift_note([]) == ""
