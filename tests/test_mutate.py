"""benchmarks/mutate.py, the mutation-testing tool: its own logic, and that its catalogue still
fits the code (no run of the real test suite here: `python benchmarks/mutate.py --catalogue`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import bench_scripts
import pytest

REPO = Path(__file__).resolve().parents[1]
mutate = bench_scripts.load("mutate")


# --------------------------------------------------------------------------- the catalogue


@pytest.mark.parametrize("m", mutate.CATALOGUE, ids=lambda m: m.name)
def test_every_catalogue_mutation_applies_to_the_current_source(m):
    """Each OLD occurs exactly once in its file, so the catalogue cannot rot silently when the
    code changes (a vanished OLD would otherwise be an error at run time, a doubled one a guess
    of which place is meant)."""
    mutate.check_mutation(REPO, m)
    assert m.old != m.new
    assert m.why and m.expected in ("killed", "survives")


@pytest.mark.parametrize("m", mutate.CATALOGUE, ids=lambda m: m.name)
def test_every_catalogue_test_exists(m):
    """Each named test is a test function of its file: a renamed test would leave a mutation
    that pytest reports as "not found" (an error, not a kill)."""
    assert m.tests
    for node in m.tests:
        file, name = node.split("::")
        source = (REPO / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE), node


def test_catalogue_names_are_unique_and_selectable():
    names = [m.name for m in mutate.CATALOGUE]
    assert len(names) == len(set(names))
    assert [m.name for m in mutate.select(names[:2])] == names[:2]
    assert mutate.select(None) == list(mutate.CATALOGUE)
    with pytest.raises(mutate.MutationError, match="unknown mutation.*no-such-one"):
        mutate.select(["no-such-one"])


# --------------------------------------------------------------------------- applying one


def test_a_missing_text_is_an_error_naming_the_file_text_and_count(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    with pytest.raises(mutate.MutationError) as info:
        mutate.apply_mutation(tmp_path, "pkg/mod.py", "y = 2", "y = 3")
    assert "pkg/mod.py" in str(info.value) and "'y = 2'" in str(info.value)
    assert "occurs 0 times" in str(info.value)
    with pytest.raises(mutate.MutationError, match="nope.py: no such file"):
        mutate.apply_mutation(tmp_path, "nope.py", "x", "y")


def test_a_text_occurring_twice_is_an_error_and_nothing_is_changed(tmp_path):
    (tmp_path / "mod.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(mutate.MutationError, match=r"mod.py: the text 'x = 1' occurs 2 times"):
        mutate.apply_mutation(tmp_path, "mod.py", "x = 1", "x = 2")
    assert (tmp_path / "mod.py").read_text() == "x = 1\nx = 1\n"
    mutate.apply_mutation(tmp_path, "mod.py", "x = 1\nx", "x = 2\nx")
    assert (tmp_path / "mod.py").read_text() == "x = 2\nx = 1\n"


def test_the_command_line_reports_a_missing_text_before_running_anything(capsys):
    code = mutate.main(["fuse4seg/study.py", "no such text", "x", "--", "tests/test_study.py"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fuse4seg/study.py: the text 'no such text' occurs 0 times" in err


# --------------------------------------------------------------------------- the copy


def test_a_copy_that_would_import_the_checkouts_package_is_refused(tmp_path):
    """fuse4seg is installed editable, pointing at the checkout: a copy without its own package
    would test the unmutated code, and every mutation would survive."""
    with pytest.raises(mutate.MutationError, match="imports fuse4seg from"):
        mutate.check_imports_copy(tmp_path, "fuse4seg")
    shutil.copytree(REPO / "fuse4seg", tmp_path / "fuse4seg")
    mutate.check_imports_copy(tmp_path, "fuse4seg")  # the copy's own


def _toy_repo(root: Path) -> Path:
    """A git repository with a module, its test, an untracked file and an ignored one."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("*.log\n")
    (root / "toy.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "test_toy.py").write_text(
        "from toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    )
    (root / "ignored.log").write_text("not copied\n")
    return root


def test_the_copy_holds_the_working_tree_without_ignored_files(tmp_path):
    repo = _toy_repo(tmp_path / "repo")
    dest = tmp_path / "copy"
    assert mutate.copy_tree(repo, dest) == 3
    assert sorted(p.name for p in dest.iterdir()) == [".gitignore", "test_toy.py", "toy.py"]
    assert mutate._module_of(dest, "toy.py") == "toy"
    assert mutate._module_of(dest, "test_data/x.txt") is None


def test_failing_line_names_the_tests_line_and_its_error():
    output = (
        "____ test_add ____\n"
        "test_toy.py:5: in test_add\n"
        "    assert add(2, 3) == 5\n"
        "E   assert -1 == 5\n"
        "E    +  where -1 = add(2, 3)\n"
    )
    assert mutate.failing_line(output) == "test_toy.py:5 assert add(2, 3) == 5 — assert -1 == 5"
    assert mutate.failing_line("[timed out after 9 s]") == "[timed out after 9 s]"


def test_only_a_failing_assertion_is_a_kill():
    """pytest exits 1 for a failing test, but also for a fixture's setup error or a test that
    imports broken code late: those are errors, not kills (a review's find)."""
    failed = "E       assert 1 == 2\n1 failed, 2 passed in 0.5s\n"
    setup = "E       RuntimeError: no data\n1 passed, 1 error in 0.5s\n"
    late = "E       SyntaxError: invalid syntax\n1 failed in 0.3s\n"
    missing = "E   ModuleNotFoundError: No module named 'x'\n1 failed in 0.3s\n"
    assert not mutate.not_a_kill(failed)
    assert mutate.not_a_kill(setup) and mutate.not_a_kill(late)
    assert mutate.not_a_kill(missing)


@pytest.mark.slow
def test_killed_survived_and_error_on_a_toy_repository(tmp_path, capsys):
    """End to end on a toy repository: a bug the test sees is killed, an equivalent change
    survives, a syntax error is an error (not a kill); the table and exit codes say so."""
    repo = _toy_repo(tmp_path / "repo")
    tests = ["test_toy.py::test_add"]
    killed = mutate.mutate_and_run(repo, "toy.py", "a + b", "a - b", tests, timeout=60)
    assert (killed.result, killed.returncode) == ("killed", 1)
    assert "test_toy.py:5 assert add(2, 3) == 5" in mutate.failing_line(killed.output)
    survived = mutate.mutate_and_run(repo, "toy.py", "a + b", "b + a", tests, timeout=60)
    assert (survived.result, survived.returncode) == ("SURVIVED", 0)
    broken = mutate.mutate_and_run(repo, "toy.py", "a + b", "a +", tests, timeout=60)
    assert broken.result == "error" and broken.returncode is None  # never ran: no compile
    assert "(does not compile)" in mutate.table([(m0 := mutate.Mutation(
        "b", "toy.py", "a + b", "a +", tuple(tests), "why"), broken)])
    assert not mutate._ok(m0, broken)
    assert (repo / "toy.py").read_text() == "def add(a, b):\n    return a + b\n"  # untouched

    m = mutate.Mutation("toy", "toy.py", "a + b", "b + a", tuple(tests), "why", "survives")
    lines = mutate.table([(m, survived), (m, killed)]).splitlines()
    assert "**SURVIVED (expected)**" in lines[2] and "**killed**" in lines[3]
    assert mutate._ok(m, survived) and not mutate._ok(m, killed)

    argv = ["--repo", str(repo), "toy.py", "a + b", "a * b", "--", *tests]
    assert mutate.main(argv) == 0  # with the baseline run first
    assert capsys.readouterr().out.startswith("killed")
