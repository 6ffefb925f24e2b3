"""``benchmarks/bench_against.py``: the train step against another checkout, in turns.

A smoke test at the smoke profile's size (not a timing): every arm runs in its own process,
the table has each process's value and each arm's ratio to ``after``, and the caller's own
``FUSE4SEG_*`` switches do not reach the processes.
"""

from __future__ import annotations

import pytest
from bench_scripts import load

TINY = ["--device", "cpu", "--size", "32", "--batch", "2", "--inner-steps", "1",
        "--profile", "smoke", "--repeats", "1", "--warmup", "1", "--threads", "1"]


def test_an_arm_is_a_name_and_switches():
    against = load("bench_against")
    assert against.parse_arm("off:FUSE4SEG_GATE=strided,FUSE4SEG_ATTENTION=autograd") == (
        "off", {"FUSE4SEG_GATE": "strided", "FUSE4SEG_ATTENTION": "autograd"})
    for bad in ("off", "off:", "off:GATE", "a b:X=1", "off:1X=2"):
        with pytest.raises(ValueError, match="--arm"):
            against.parse_arm(bad)


def test_step_times_reads_the_variants_row_and_says_when_it_did_not_run():
    against = load("bench_against")
    out = ("| variant | outer step (ms) | × eager | slices/s | warm-up step (ms) | ...\n"
           "| eager | 1,234.5 | 1.00 | 6.5 | 98.7 | 1.00 | 0.1 | n/a | - | 9.9 |\n"
           "| cl | failed: RuntimeError: boom | | | | | | | | |\n")
    assert against.step_times(out, "eager") == (1234.5, 98.7)
    with pytest.raises(ValueError, match="'cl' did not run"):
        against.step_times(out, "cl")
    with pytest.raises(ValueError, match="no row for variant 'amp'"):
        against.step_times(out, "amp")


@pytest.mark.slow
def test_bench_against_runs_every_arm_in_turns(capsys, monkeypatch, tmp_path):
    against = load("bench_against")
    # a caller's switch (here one no process could run with) must not reach the processes
    monkeypatch.setenv("FUSE4SEG_ATTENTION", "not-a-value")
    assert against.main(["--before", str(against.ROOT), "--arm",
                         "off:FUSE4SEG_ATTENTION=autograd", "--triples", "2", "--", *TINY]) == 0
    out = capsys.readouterr().out
    groups = [line for line in out.splitlines() if line.startswith("# group")]
    assert [g.split(":")[0] for g in groups] == [
        "# group 1, before", "# group 1, off", "# group 1, after",
        "# group 2, after", "# group 2, off", "# group 2, before"]
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith("| ")}
    for arm in ("before", "off", "after"):
        cells = [c.strip() for c in rows[arm].strip("| ").split("|")]
        assert len(cells[1].split(" · ")) == 2 and float(cells[2]) > 0 and float(cells[4]) > 0
    assert "after faster in" in rows["before / after"] and "of 2" in rows["off / after"]


def test_bench_against_refuses_an_unknown_commit_and_a_bad_arm(capsys):
    against = load("bench_against")
    with pytest.raises(SystemExit, match="--before 'no-such-commit': git archive failed"):
        against.main(["--before", "no-such-commit", "--", *TINY])
    with pytest.raises(SystemExit):
        against.main(["--arm", "off", "--", *TINY])
    assert "--arm 'off': expected NAME:VAR=VALUE" in capsys.readouterr().err


def test_a_relative_before_folder_reaches_its_process_as_an_absolute_tree(monkeypatch):
    """Each process runs in its tree with the tree as ``PYTHONPATH``; a relative ``--before``
    would be read from the wrong folder there and the child would import the installed
    package (this checkout) instead of the old code. Checked without running the benchmark."""
    import subprocess
    from pathlib import Path

    against = load("bench_against")
    seen = []

    def fake_run(cmd, cwd, env, **kwargs):
        seen.append((Path(cwd), env["PYTHONPATH"]))
        row = "| eager | 10.0 | 1.00 | 1 | 5.0 | 1.00 | 0.1 | n/a | - | 1 |"
        return subprocess.CompletedProcess(cmd, 0, stdout=row.replace("eager", cmd[-1]))

    monkeypatch.setattr(against.subprocess, "run", fake_run)
    monkeypatch.chdir(against.ROOT.parent)
    assert against.main(["--before", against.ROOT.name, "--triples", "1", "--", *TINY]) == 0
    assert seen and all(cwd.is_absolute() and Path(path) == cwd for cwd, path in seen)


def test_arm_names_must_differ(capsys):
    against = load("bench_against")
    for arms in (["--arm", "x:A=1", "--arm", "x:B=2"], ["--arm", "after:A=1"]):
        with pytest.raises(SystemExit):
            against.main([*arms, "--", *TINY])
        assert "--arm names must differ" in capsys.readouterr().err
