"""Chapters refuse parameters they do not declare (``fuse4seg.book.check_parameters``).

Papermill only warns about ``-p NAME VALUE`` when ``NAME`` is not in the ``parameters`` cell
and runs the notebook anyway; each chapter's second cell raises instead, however the chapter is
run (``book/build.py`` passes only declared names, so a build never trips it). The slow tests
call the papermill command line as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuse4seg.book import UnknownParameterError, check_parameters

REPO = Path(__file__).resolve().parents[1]

PARAMETERS = 'profile = "default"  # smoke | default | paper\ndevice = "auto"\noverrides = {}\n'
CHECK = "from fuse4seg.book import check_parameters\n\ncheck_parameters(globals())\n"


def _history(*cells: str) -> dict:
    """A kernel namespace whose input history (IPython's ``In``) ran ``cells``, then the
    check."""
    return {"In": ["", *cells, CHECK]}


def test_declared_injected_names_pass():
    check_parameters(_history(PARAMETERS, '# Parameters\nprofile = "smoke"\ndevice = "cpu"\n'))


def test_no_injection_passes():
    check_parameters({})  # not IPython
    check_parameters(_history())  # the check alone
    check_parameters(_history(PARAMETERS))  # JupyterLab: run the cells in order
    # JupyterLab, the chapter run and the check run again: nothing injected before it
    check_parameters(_history(PARAMETERS, CHECK, "x = 1\nprint(x)", "profil = 3"))


def test_a_misspelt_injected_name_is_refused_with_the_valid_names():
    injected = '# Parameters\nprofil = "smoke"\ndevic = "cuda"\n'
    with pytest.raises(UnknownParameterError) as info:
        check_parameters(_history(PARAMETERS, injected))
    message = str(info.value)
    assert "'profil' (did you mean 'profile'?)" in message
    assert "'devic' (did you mean 'device'?)" in message
    assert message.endswith("The valid names are: profile, device, overrides")
    assert isinstance(info.value, ValueError)


def test_papermill_paths_are_accepted_and_a_missing_parameters_cell_is_named():
    paths = '# Parameters\nPAPERMILL_INPUT_PATH = "a.ipynb"\nPAPERMILL_OUTPUT_PATH = "b.ipynb"\n'
    check_parameters(_history(PARAMETERS, paths))
    # papermill puts the injected cell first when a notebook has no parameters cell
    with pytest.raises(UnknownParameterError, match="valid names are: none"):
        check_parameters({"In": ["", '# Parameters\nprofile = "smoke"\n', CHECK]})


# --------------------------------------------------------------------------------------------
# The papermill command line on real notebooks (slow: a kernel each)
# --------------------------------------------------------------------------------------------


def _papermill(notebook: Path, out: Path, *parameters: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "papermill", str(notebook), str(out), "--cwd", str(REPO)]
    for pair in parameters:
        command += ["-p", *pair.split("=", 1)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.xdist_group("kernels")
def test_papermill_with_a_misspelt_name_fails_on_a_chapter(tmp_path):
    """The README's papermill call with a typo stops at the chapter's second cell."""
    import jupytext

    notebook = tmp_path / "ch2.ipynb"
    jupytext.write(jupytext.read(REPO / "book" / "02_fusion_leader.md"), notebook)
    result = _papermill(notebook, tmp_path / "out.ipynb", "profil=smoke", "device=cpu")
    assert result.returncode != 0, result.stdout + result.stderr
    assert (
        "UnknownParameterError: unknown parameter 'profil' (did you mean 'profile'?) passed "
        "to this chapter (papermill -p). The valid names are: profile, data_dir, device, "
        "overrides"
    ) in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("kernels")
def test_papermill_with_declared_names_runs_a_checked_notebook(tmp_path):
    import jupytext

    notebook = jupytext.reads(
        "```{code-cell} ipython3\n:tags: [parameters]\n\n" + PARAMETERS + "```\n\n"
        "```{code-cell} ipython3\n:tags: [remove-cell]\n\n" + CHECK + "```\n\n"
        '```{code-cell} ipython3\nprint(f"ran with {profile}/{device}")\n```\n',
        fmt="md:myst",
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    path = tmp_path / "tiny.ipynb"
    jupytext.write(notebook, path)
    for parameters, printed in ((("profile=smoke", "device=cpu"), "smoke/cpu"),
                                ((), "default/auto")):
        out = tmp_path / "out.ipynb"
        result = _papermill(path, out, *parameters)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"ran with {printed}" in out.read_text()
    result = _papermill(path, out, "overides={}")
    assert result.returncode != 0
    assert "'overides' (did you mean 'overrides'?)" in result.stderr
